"""The cpu backend's graph loader gives the very program torch's own deserializer gives, and its
binding the very outputs `ExportedProgram.module()` gives."""

import json

import torch
from torch import nn
from torch._export.serde.serialize import SerializedArtifact, deserialize

from cluster.trace.cpu import _PROGRAM_KEY, CpuBackend, _FlatCall, _safetensors_metadata
from cluster.trace.program_serde import deserialize_program


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("scale", torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.proj(self.norm(x))) * self.scale
        return h.masked_fill(mask[..., None], 0.0).softmax(-1), h.sum(dim=1)


def _exported(inline: bool) -> tuple[torch.export.ExportedProgram, dict | None, tuple]:
    torch.manual_seed(0)
    model = _Block().eval()
    example = (torch.randn(2, 5, 8), torch.tensor([[False, True, False, False, True]] * 2))
    weights = None if inline else {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    return CpuBackend().trace(model, example, weights), weights, example


def test_same_program_as_torch_deserialize():
    for inline in (True, False):
        program, weights, example = _exported(inline)
        backend = CpuBackend()
        blob = backend.dump(program)
        ours = backend.load(blob, "test graph")
        text = _safetensors_metadata(blob)[_PROGRAM_KEY].encode("utf-8")
        theirs = deserialize(SerializedArtifact(text, dict(program.state_dict), dict(program.constants), None))
        assert str(ours.graph) == str(theirs.graph)
        assert str(ours.graph_signature) == str(theirs.graph_signature)
        assert ours.call_spec.in_spec == theirs.call_spec.in_spec
        with torch.no_grad():
            got = backend.bind(ours, weights)(*example)
            expected = backend.bind(theirs, weights)(*example)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        if weights is not None:  # bound without ExportedProgram.module(): the same outputs as through it
            assert isinstance(backend.bind(ours, weights), _FlatCall)
            with torch.no_grad():
                unlifted = ours.module()(weights, *example)
            assert all(torch.equal(a, b) for a, b in zip(got, unlifted))


def test_deserialize_program_ignores_unknown_keys():
    """As torch does: a program written by a newer torch with fields this one does not know loads."""
    program, _, _ = _exported(True)
    text = _safetensors_metadata(CpuBackend().dump(program))[_PROGRAM_KEY]
    data = json.loads(text)
    data["a_field_from_a_newer_torch"] = 1
    data["graph_module"]["another_new_field"] = {"x": 1}
    loaded = deserialize_program(json.dumps(data).encode(), dict(program.state_dict), dict(program.constants))
    theirs = deserialize(SerializedArtifact(text.encode(), dict(program.state_dict), dict(program.constants), None))
    assert str(loaded.graph) == str(theirs.graph)
