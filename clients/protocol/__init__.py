"""Generated tpcluster.v1 protocol code (from proto/tpcluster/v1/inference.proto).

Import the stubs as `from clients.protocol import inference_pb2 as pb, inference_pb2_grpc as pb_grpc`.
"""

SERVICE = "tpcluster.v1.Inference"
