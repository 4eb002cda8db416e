"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`) on the gateway's port.

Each method is decode (actors.gateway.oip_codec) -> the same ServedModel call tpcluster.v1 makes
(so the same batchers, replicas, metrics and status codes) -> encode. ModelInfer maps onto every
served model:

- embed / classify: BYTES `text` (and `text_pair`) -> `embedding`, or `logits`, `label_id`, `label`
  (Embed and Classify); inputs named as Infer's (`input_ids`, ...) run Infer instead.
- infer: raw tensors, matched to the model's inputs by name or position (Infer).
- generate: BYTES `text_input` -> `text_output`, sampling from the request's parameters
  (`max_tokens`, `temperature`, `top_k`, `top_p`, `seed`, `stop`, `draft_model`,
  `speculation_length`; Generate, gathered into one response).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.gateway import oip_codec
from actors.gateway.codec import decode_texts
from actors.gateway.observed import ObservedServicer, _version
from clients.protocol import grpc_predict_v2_pb2 as oip
from clients.protocol import grpc_predict_v2_pb2_grpc as oip_grpc
from cluster.errors import InputError, ModelNotFound

TEXT_INPUTS = {"embed": {"text"}, "classify": {"text", "text_pair"}}


class OpenInferenceServicer(ObservedServicer, oip_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` over the gateway's served models (metrics label methods `oip.NAME`)."""

    async def ServerLive(self, request, context):
        async def handler():
            return oip.ServerLiveResponse(live=True)
        return await self._unary("oip.ServerLive", request, context, handler, model="")

    async def ServerReady(self, request, context):
        async def handler():  # what gRPC health's "" says (actors.gateway.readiness): any model ready
            return oip.ServerReadyResponse(ready=self.registry.readiness.server)
        return await self._unary("oip.ServerReady", request, context, handler, model="")

    async def ModelReady(self, request, context):
        async def handler():
            model = self._model(request.name, request.version)  # NOT_FOUND for a name not served
            return oip.ModelReadyResponse(ready=self.registry.readiness.model(model.name))
        return await self._unary("oip.ModelReady", request, context, handler, model=request.name)

    async def ServerMetadata(self, request, context):
        async def handler():
            return oip.ServerMetadataResponse(name="tpcluster", version=_version(), extensions=[])
        return await self._unary("oip.ServerMetadata", request, context, handler, model="")

    async def ModelMetadata(self, request, context):
        async def handler():
            return oip_codec.model_metadata(self._model(request.name, request.version))
        return await self._unary("oip.ModelMetadata", request, context, handler, model=request.name)

    async def ModelInfer(self, request, context):
        async def handler():
            model = self._model(request.model_name, request.model_version)
            inputs = oip_codec.decode_inputs(request)
            names = [name for name, _ in inputs]
            if len(set(names)) != len(names):
                raise InputError(f"input names {names} repeat; send each input once")
            timeout = self._timeout(context)
            task = model.spec.task
            if task == "generate":
                outputs, parameters = await self._generate(model, dict(inputs), request.parameters, timeout)
                return oip_codec.infer_response(request, outputs, parameters)
            if task in TEXT_INPUTS and set(names) <= TEXT_INPUTS[task]:
                return oip_codec.infer_response(request, await self._text_task(model, dict(inputs), timeout))
            if any(a.dtype == object for _, a in inputs):
                expected = sorted(TEXT_INPUTS.get(task, ())) or [t.name for t in model.inputs]
                raise InputError(f"model {model.name!r} takes BYTES inputs {expected} only; got {names}")
            return oip_codec.infer_response(request, await model.infer(inputs, timeout))
        return await self._unary("oip.ModelInfer", request, context, handler, model=request.model_name)

    def _model(self, name: str, version: str) -> Any:
        if not name:
            raise ModelNotFound(f"no model name given; served models: {sorted(self.registry.models)}")
        model = self.registry.get(name)
        if version not in ("", oip_codec.VERSION):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; its only version is {oip_codec.VERSION!r}")
        return model

    @staticmethod
    async def _text_task(model: Any, inputs: dict[str, np.ndarray], timeout: float) -> list[tuple[str, np.ndarray]]:
        if "text" not in inputs:
            raise InputError(f"model {model.name!r} needs a BYTES input named 'text'")
        texts = oip_codec.texts_of(inputs["text"], "text")
        if model.spec.task == "embed":
            return [("embedding", await model.embed(decode_texts(texts), timeout))]
        pairs: list[Any] = [None] * len(texts)
        if "text_pair" in inputs:
            pairs = oip_codec.texts_of(inputs["text_pair"], "text_pair")
            if len(pairs) != len(texts):
                raise InputError(f"text holds {len(texts)} texts and text_pair {len(pairs)}; send one pair per text")
        results = await model.classify(list(zip(decode_texts(texts), pairs)), timeout)
        return [("logits", np.stack([r.logits for r in results]).astype(np.float32)),
                ("label_id", np.array([r.label_id for r in results], dtype=np.int64)),
                ("label", np.array([r.label for r in results], dtype=object))]

    async def _generate(self, model: Any, inputs: dict[str, np.ndarray], parameters: Any,
                        timeout: float) -> tuple[list[tuple[str, np.ndarray]], dict[str, Any]]:
        prompt, sampling = oip_codec.generate_request(model.name, inputs, parameters)
        draft = model.draft_named(sampling.draft_model, self.registry)
        text, stats = "", None
        async for token, piece in model.generate(prompt, sampling, draft, timeout):
            if token is None:
                stats = piece
            else:
                text += piece
        summary = {"finish_reason": stats.finish_reason, "prompt_tokens": stats.prompt_tokens,
                   "generated_tokens": stats.generated_tokens}
        return [("text_output", np.array([text], dtype=object))], summary
