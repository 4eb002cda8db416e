"""Generated protocol code: tpcluster.v1 (from proto/tpcluster/v1/inference.proto) and the Open
Inference Protocol (from proto/inference/grpc_predict_v2.proto, as `grpc_predict_v2_pb2*`).

Import the stubs as `from clients.protocol import inference_pb2 as pb, inference_pb2_grpc as pb_grpc`.
"""

SERVICE = "tpcluster.v1.Inference"
OIP_SERVICE = "inference.GRPCInferenceService"
"""The Open Inference Protocol (KServe v2) service the gateway also serves: `grpc_predict_v2_pb2*`."""
