"""Triton's `tritonclient.grpc`, unchanged, in a child process against a gateway.

A child process because tritonclient's generated `inference.*` messages and the gateway's own
(clients/protocol/grpc_predict_v2_pb2.py) share their full names, and one protobuf descriptor pool
holds each name once. The child imports nothing of this project.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

PRELUDE = '''
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

target, token = sys.argv[1], sys.argv[2]
headers = {"authorization": "Bearer " + token} if token else None
client = grpcclient.InferenceServerClient(target)


def tensor(name, array, datatype=None):
    array = np.asarray(array)
    t = grpcclient.InferInput(name, list(array.shape), datatype or ("BYTES" if array.dtype == object else
                                                                   {"int64": "INT64", "float32": "FP32"}[array.dtype.name]))
    t.set_data_from_numpy(array)
    return t


def infer(model, named, outputs=None, parameters=None, **kwargs):
    requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
    result = client.infer(model, [tensor(n, a) for n, a in named.items()], outputs=requested, headers=headers,
                          parameters=parameters, **kwargs)
    response = result.get_response()
    out = {}
    for o in response.outputs:
        array = result.as_numpy(o.name)
        out[o.name] = [x.decode() if isinstance(x, bytes) else x for x in array.reshape(-1).tolist()]
        out[o.name + ".shape"] = list(array.shape)
    out["id"] = response.id
    return out


def error(call):
    try:
        call()
    except InferenceServerException as exc:
        return [exc.status(), exc.message()]
    return None
'''


def run_tritonclient(target: str, script: str, token: str | None = None) -> Any:
    """Run `script` after PRELUDE (names: client, headers, tensor, infer, error) and return what it
    printed last, as JSON."""
    with tempfile.TemporaryDirectory() as cwd:  # nothing of the repository on the child's path
        done = subprocess.run([sys.executable, "-c", PRELUDE + script, target, token or ""], capture_output=True,
                              text=True, timeout=180, cwd=cwd, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
