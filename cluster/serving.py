"""serving.json: how the gateway serves a saved model (task, tokenizer, labels). No torch here."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.errors import ArtifactError

SERVING_FILE = "serving.json"
TASKS = ("embed", "classify", "infer", "generate")


@dataclass(frozen=True)
class ServingSpec:
    task: str = "infer"
    tokenizer: str | None = None  # folder, relative to the model folder
    labels: tuple[str, ...] = ()
    pair_encoding: str = "joint"  # classify: "joint" (one sequence, BERT style) or "separate" (bi-encoder)
    max_length: int = 0  # longest input in tokens; 0: from the buckets
    batch_buckets: tuple[int, ...] = (1,)
    seq_buckets: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"serving task must be one of {TASKS}, got {self.task!r}")
        if self.pair_encoding not in ("joint", "separate"):
            raise ValueError(f"pair_encoding must be 'joint' or 'separate', got {self.pair_encoding!r}")

    def write(self, folder: str | os.PathLike) -> None:
        data = asdict(self)
        (Path(folder) / SERVING_FILE).write_text(json.dumps(data, indent=1))

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "ServingSpec":
        path = Path(folder) / SERVING_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            data["labels"] = tuple(data.get("labels", ()))
            data["batch_buckets"] = tuple(data.get("batch_buckets", (1,)))
            data["seq_buckets"] = tuple(data.get("seq_buckets", ()))
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: invalid serving spec ({exc})") from exc
