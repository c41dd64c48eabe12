"""Tiny GGUF checkpoints written with the ``gguf`` package, for the streaming loader's tests.

A 2-layer model of hidden size 256 (K-quant blocks are 256 wide) in llama.cpp's tensor names and
metadata, with the tensor types the real files use: F32 norms and biases, Q8_0 and Q5_0 (quantized
by the gguf package), Q4_K and Q6_K (blocks of random codes with fp16 scales in a sane range, since
the gguf package cannot quantize K-quants), and F16. Hidden dim ``OUTLIER_DIM`` is planted as an
outlier feature: large in the embedding and lifted by every norm's gain, as large models grow one.
A byte-level BPE vocabulary of the 256 bytes (``tokenizer.ggml.model = gpt2``) lets transformers build
a tokenizer from the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

gguf = __import__("pytest").importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
OUTLIER_DIM = 5
# llama.cpp block layouts (bytes): Q4_K = d, dmin (fp16) + 12 scale bytes + 128 nibble bytes;
# Q6_K = 128 low-nibble + 64 high-bit + 16 int8 scale bytes + d (fp16).
_K_BLOCKS = {Q.Q4_K: (144, (0, 2)), Q.Q6_K: (210, (208,))}


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for every byte (the byte-level BPE alphabet), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _k_quant(rng, rows: int, cols: int, qtype) -> np.ndarray:
    """Random K-quant blocks [rows, cols / 256 * block bytes] whose fp16 scales are small and finite."""
    block_bytes, scale_offsets = _K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scale = rng.uniform(2e-4, 1e-3, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: str | Path, arch: str = "qwen2", seed: int = 0, drop: set[str] = frozenset()) -> Path:
    """A tiny ``arch`` ("qwen2": q/k/v biases, untied head; "llama": q/k rows permuted as llama.cpp
    writes them, head tied to the embedding) GGUF file at ``path``, without the tensors named in ``drop``."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    merges = ["t o", "Ġ b", "b e"]  # a few merges: transformers wants some to build a byte-level BPE
    vocab = _bytes_to_unicode() + [m.replace(" ", "") for m in merges] + ["<eos>"]
    writer = gguf.GGUFWriter(str(path), arch)
    add_tensor = writer.add_tensor

    def add(name, *args, **kwargs):  # every tensor is drawn, dropped or not, so the others do not change
        if name not in drop:
            add_tensor(name, *args, **kwargs)

    writer.add_tensor = add
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * (len(vocab) - 1) + [3])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(len(vocab) - 1)
    writer.add_bos_token_id(len(vocab) - 1)

    def dense(rows, cols, scale):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def quantized(name, rows, cols, qtype):
        if qtype in _K_BLOCKS:
            writer.add_tensor(name, _k_quant(rng, rows, cols, qtype), raw_dtype=qtype)
        elif qtype == Q.F16:
            writer.add_tensor(name, dense(rows, cols, 0.05).astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(dense(rows, cols, 0.05), qtype), raw_dtype=qtype)

    embedding = dense(len(vocab), HIDDEN, 0.5)
    embedding[:, OUTLIER_DIM] = 30.0  # the residual stream's outlier dim
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embedding, Q.Q8_0), raw_dtype=Q.Q8_0)
    if arch == "qwen2":
        quantized("output.weight", len(vocab), HIDDEN, Q.Q6_K)
    norm = np.ones(HIDDEN, dtype=np.float32)
    norm[OUTLIER_DIM] = 4.0  # RMSNorm shrinks the dim to ~sqrt(hidden); its gain lifts it above alpha
    writer.add_tensor("output_norm.weight", norm)
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        quantized(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN, Q.Q4_K)
        quantized(f"blk.{i}.attn_k.weight", kv, HIDDEN, Q.Q5_0)
        quantized(f"blk.{i}.attn_v.weight", kv, HIDDEN, Q.Q8_0)
        quantized(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN, Q.F16)
        quantized(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN, Q.Q4_K)
        quantized(f"blk.{i}.ffn_up.weight", FFN, HIDDEN, Q.Q5_0)
        quantized(f"blk.{i}.ffn_down.weight", HIDDEN, FFN, Q.Q6_K)
        if arch == "qwen2":
            for proj, rows in (("q", HIDDEN), ("k", kv), ("v", kv)):
                writer.add_tensor(f"blk.{i}.attn_{proj}.bias", (rng.standard_normal(rows) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
