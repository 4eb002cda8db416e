"""The NxD inference guide's BERT example, ported by changing imports only.

Differences from the guide are transformers 5's, not ours: `tokenizer.encode_plus` is gone (call
the tokenizer), `torchscript=True` is refused (`return_dict=False` gives the same tuple outputs),
and the checkpoint is MiniLM with a 2-label head instead of bert-base-cased-finetuned-mrpc, which
no machine here can download.
"""

from typing import List

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.models.bert.modeling_bert import BertSelfAttention, BertSelfOutput

import cluster  # was: import neuronx_distributed
from cluster.models.bert import minilm_path
from cluster.parallel_layers import layers, parallel_state  # was: neuronx_distributed.parallel_layers

name = str(minilm_path())
CHECKPOINT = "bert.pt"  # relative: resolved in the ranks against the caller's working directory


def encode(tokenizer, *inputs, max_length=128, batch_size=1):
    tokens = tokenizer(*inputs, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    return (
        torch.repeat_interleave(tokens["input_ids"], batch_size, 0),
        torch.repeat_interleave(tokens["attention_mask"], batch_size, 0),
        torch.repeat_interleave(tokens["token_type_ids"], batch_size, 0),
    )


tokenizer = AutoTokenizer.from_pretrained(name)
sequence_0 = "The company HuggingFace is based in New York City"
sequence_1 = "Apples are especially bad for your health"
sequence_2 = "HuggingFace's headquarters are situated in Manhattan"
paraphrase = encode(tokenizer, sequence_0, sequence_2)
not_paraphrase = encode(tokenizer, sequence_1, sequence_1)


def cpu_model():
    return AutoModelForSequenceClassification.from_pretrained(name, return_dict=False, num_labels=2).eval()


def save_checkpoint(path=CHECKPOINT):
    torch.manual_seed(0)  # the 2-label head is new: fix it, then every copy loads it from bert.pt
    model = cpu_model()
    torch.save({"model": model.state_dict()}, path)
    return model


def get_model():
    model = AutoModelForSequenceClassification.from_pretrained(name, return_dict=False, num_labels=2)

    class ParallelSelfAttention(BertSelfAttention):
        def __init__(self, config, position_embedding_type=None):
            super().__init__(config, position_embedding_type)
            self.query = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.key = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.value = layers.ColumnParallelLinear(config.hidden_size, self.all_head_size, gather_output=False)
            self.num_attention_heads = self.num_attention_heads // parallel_state.get_tensor_model_parallel_size()
            self.all_head_size = self.all_head_size // parallel_state.get_tensor_model_parallel_size()

    class ParallelSelfOutput(BertSelfOutput):
        def __init__(self, config):
            super().__init__(config)
            self.dense = layers.RowParallelLinear(config.hidden_size, config.hidden_size, input_is_parallel=True)

    for layer in model.bert.encoder.layer:
        layer.attention.self = ParallelSelfAttention(model.config)
        layer.attention.output = ParallelSelfOutput(model.config)

    cluster.parallel_layers.load(CHECKPOINT, model, sharded=False)
    io_aliases = {}
    return model, io_aliases


def sequence_length_bucket_kernel(tensor_list: List[torch.Tensor]):
    x = tensor_list[0]
    bucket_dim = 1
    x_shape = x.shape
    tensor_sequence_length = x_shape[bucket_dim]
    batch_size = x_shape[bucket_dim - 1]
    buckets = [128, 512]
    idx = 0
    num_inputs = 3
    bucket = buckets[0]
    reshaped_tensors: List[torch.Tensor] = []
    bucket_idx = 0
    for idx, bucket in enumerate(buckets):
        if tensor_sequence_length <= bucket:
            bucket_idx = idx
            for tensor in tensor_list:
                if num_inputs == 0:
                    break
                delta = bucket - tensor_sequence_length
                padding_shape: List[int] = [batch_size, delta]
                zeros = torch.zeros(padding_shape, dtype=x.dtype)
                reshaped_tensors.append(torch.cat([tensor, zeros], dim=bucket_dim))
                num_inputs -= 1
            break
    return reshaped_tensors, torch.tensor([bucket_idx])


def get_bucket_kernel(*_):
    bk = torch.jit.script(sequence_length_bucket_kernel)
    return bk


paraphrase_long = encode(tokenizer, sequence_0, sequence_2, max_length=512)
