"""``llm-int8 serve`` end to end: the real SmolLM2-135M in int8, started as a subprocess on a free loopback
port, driven by the official ``openai`` client (and raw HTTP for what the client will not send).

Every greedy (``temperature=0``) reply is compared token for token with an offline ``generate()`` of the
same int8 model in this process. One server for the whole module; replies are a few tokens long.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")

import llm_int8  # noqa: E402
from llm_int8.eval.models import load_int8_model  # noqa: E402
from llm_int8.nn import Linear8bitLt  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
START_TIMEOUT_S = 600  # model load on a busy 2-core machine
REQUEST_TIMEOUT_S = 300
MAX_TOKENS = 10
MODEL = "smollm2-135m"
URL_LINE = re.compile(r"^serving (\S+) \((\S+)\) at (http://\S+)/v1")


class Server:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_int8.cli", "serve", "--port", "0", "--no-progress"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        self.lines: list[str] = []
        self.started = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()

    def wait_started(self):
        if not self.started.wait(START_TIMEOUT_S) or self.url is None:
            self.proc.kill()
            raise RuntimeError("llm-int8 serve did not start:\n" + "".join(self.lines[-40:]))

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            match = URL_LINE.match(line)
            if match:
                self.url = match.group(3)
                self.started.set()
        self.started.set()  # the process ended

    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def server_process():
    srv = Server()  # loads in its own process while this one loads the offline model
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


@pytest.fixture(scope="module")
def server(server_process, offline):
    server_process.wait_started()
    return server_process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=REQUEST_TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def offline(server_process):
    torch.manual_seed(0)
    model, tokenizer = load_int8_model(MODEL)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear8bitLt)

    @torch.inference_mode()
    def greedy(inputs, max_new_tokens=MAX_TOKENS) -> tuple[list[int], str]:
        ids = inputs["input_ids"]
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        return new, tokenizer.decode(new, skip_special_tokens=True)

    def chat(messages, **kw):
        return greedy(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True), **kw)

    def complete(prompt, **kw):  # transformers' completion handler tokenizes the prompt this way
        return greedy(tokenizer(prompt, return_tensors="pt"), **kw)

    return chat, complete


CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = ["The most famous line in Hamlet is", "Once upon a time", "To be, or not to be:", "The capital of Italy is"]


def _post(url: str, data: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


# ------------------------------------------------------------------------------------------------
# Loading (in process, a tiny random Llama: fast)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_serve")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(sorted(set("abcdefghijklmnopqrstuvwxyz ,.")))}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("[\\s\\S]"), "isolated")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    return root


def test_load_for_serving_quantizes_a_float_directory_and_reloads_a_saved_one(tiny_dir):
    from llm_int8.integrations.serve import load_for_serving

    served = load_for_serving(str(tiny_dir / "float"))
    assert served.name == "float" and served.quantization == "llm-int8" and served.context_length == 64
    layer = served.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Linear8bitLt)
    served.model.save_pretrained(tiny_dir / "saved")
    served.tokenizer.save_pretrained(tiny_dir / "saved")
    again = load_for_serving(str(tiny_dir / "saved"), name="mine")
    assert again.name == "mine"
    reloaded = again.model.model.layers[0].mlp.down_proj
    assert isinstance(reloaded, Linear8bitLt)
    assert torch.equal(reloaded.weight, layer.weight) and torch.equal(reloaded.SCB, layer.SCB)
    with pytest.raises(ValueError, match="serves as llm-int8 only, not fp32"):
        load_for_serving(str(tiny_dir / "saved"), "fp32")


def test_load_for_serving_baselines_and_refusals(tiny_dir, tmp_path):
    from llm_int8.integrations.serve import load_for_serving

    fp32 = load_for_serving(str(tiny_dir / "float"), "fp32")
    assert type(fp32.model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    bnb = pytest.importorskip("bitsandbytes")
    served = load_for_serving(str(tiny_dir / "float"), "bnb-8bit")
    layer = served.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8  # quantized before serving
    assert served.memory_bytes < fp32.memory_bytes
    with pytest.raises(ValueError, match="quantization must be one of llm-int8, fp32, bnb-8bit, got 'int4'"):
        load_for_serving(str(tiny_dir / "float"), "int4")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="is a gptq checkpoint, not one llm-int8 saved"):
        load_for_serving(str(other))
    with pytest.raises(FileNotFoundError, match="neither one of smollm2-135m"):
        load_for_serving(str(tmp_path / "missing"))


def test_load_for_serving_head_in_int8_and_batch_invariant(tiny_dir):
    from llm_int8.integrations.serve import load_for_serving, startup_text

    plain = load_for_serving(str(tiny_dir / "float"))
    served = load_for_serving(str(tiny_dir / "float"), quantize_head=True, batch_invariant=True)
    assert isinstance(served.model.lm_head, Linear8bitLt) and not isinstance(plain.model.lm_head, Linear8bitLt)
    assert served.memory_bytes < plain.memory_bytes
    layers = [m for m in served.model.modules() if isinstance(m, Linear8bitLt)]
    assert len(layers) == 2 * 7 + 1 and all(m.batch_invariant for m in layers)
    assert not any(m.batch_invariant for m in plain.model.modules() if isinstance(m, Linear8bitLt))
    assert served.options == ("head int8", "batch-invariant")
    assert "\n  head int8, batch-invariant\n" in startup_text(served, "http://127.0.0.1:1", False, 0)
    with pytest.raises(ValueError, match="head int8 and batch-invariant apply to llm-int8 only, not to fp32"):
        load_for_serving(str(tiny_dir / "float"), "fp32", quantize_head=True, batch_invariant=True)
    plain.model.save_pretrained(tiny_dir / "saved_plain")
    plain.tokenizer.save_pretrained(tiny_dir / "saved_plain")
    with pytest.raises(ValueError, match="served as it was saved; quantize_head and int8_embedding apply when quantizing"):
        load_for_serving(str(tiny_dir / "saved_plain"), quantize_head=True)


def test_load_for_serving_int8_embedding_of_an_untied_model(tiny_dir):
    from llm_int8 import Embedding8bit
    from llm_int8.integrations.serve import load_for_serving

    plain = load_for_serving(str(tiny_dir / "float"), quantize_head=True)
    small = load_for_serving(str(tiny_dir / "float"), quantize_head=True, int8_embedding=True)
    float_table = plain.model.get_input_embeddings().weight
    table = small.model.get_input_embeddings()
    assert isinstance(table, Embedding8bit) and small.options == ("head int8", "embedding int8")
    codes, scales = llm_int8.functional.quantize_weight(float_table)  # each row with its own absmax
    assert torch.equal(table.weight, codes) and torch.equal(table.SCB, scales)
    assert small.memory_bytes < plain.memory_bytes
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(table(ids), table.dequantize()[ids])
        small.model(input_ids=ids)  # the model runs on it
    with pytest.raises(TypeError, match="from_embedding expects an nn.Embedding, got Linear"):
        Embedding8bit.from_embedding(torch.nn.Linear(2, 2))


def test_continuous_batching_gets_a_bounded_cache(tiny_dir):
    from llm_int8.integrations import serve

    served = serve.load_for_serving(str(tiny_dir / "float"))
    _, state = serve.build_app(served, continuous_batching=True)
    assert state._cb_config.num_blocks == serve.CB_NUM_BLOCKS and state._cb_config.max_batch_tokens == serve.CB_MAX_BATCH_TOKENS
    _, state = serve.build_app(served)
    assert state._cb_config is None and not state._continuous_batching


# ------------------------------------------------------------------------------------------------
# The server


@pytest.mark.slow
def test_startup_line_health_and_models(server, client):
    out = server.output()
    assert server.url.startswith("http://127.0.0.1:")
    assert re.search(r"model memory \d+ MiB \(parameters \+ buffers\), process RSS \d+ MiB", out)
    assert "continuous batching off" in out
    with urllib.request.urlopen(f"{server.url}/health", timeout=REQUEST_TIMEOUT_S) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.slow
def test_chat_greedy_equals_offline_generate(client, offline):
    ids, text = offline[0](CHAT)
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == len(ids)
    assert reply.choices[0].finish_reason == ("length" if len(ids) == MAX_TOKENS else "stop")


@pytest.mark.slow
def test_chat_streaming_equals_offline_generate(client, offline):
    ids, text = offline[0](CHAT)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == len(ids)


@pytest.mark.slow
def test_completion_greedy_equals_offline_generate(client, offline):
    ids, text = offline[1](PROMPTS[0])
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS)
    assert reply.choices[0].text == text and reply.usage.completion_tokens == len(ids)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=MAX_TOKENS, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text


@pytest.mark.slow
def test_concurrent_requests_each_get_their_own_reply(client, offline):
    expected = [offline[1](p, max_new_tokens=6)[1] for p in PROMPTS]
    replies = [None] * len(PROMPTS)

    def ask(i):
        replies[i] = client.completions.create(model=MODEL, prompt=PROMPTS[i], temperature=0, max_tokens=6).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    assert replies == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("completions", b'{"model": "smollm2-135m", "prompt": "hi", ', 422, "JSON"),
        ("chat/completions", {"model": "gpt-4o", "messages": CHAT}, 400, "pinned to 'smollm2-135m'"),
        ("completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens must be a positive integer, got -3"),
        ("chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens must be a positive integer"),
        ("completions", {"prompt": "hello " * 9000, "max_tokens": 4}, 400, "more than the model's context of 8192 tokens"),
        ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature must be a number in [0, 2]"),
        ("chat/completions", {"messages": []}, 400, "messages must be a non-empty list"),
        ("chat/completions", {"messages": [{"content": "no role"}]}, 400, "must be an object with a string 'role'"),
        ("completions", {"prompt": [1, 2, 3]}, 400, "prompt must be a string"),
    ],
)
def test_bad_request_gets_4xx_and_the_server_keeps_serving(server, client, offline, path, body, status, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, text = _post(f"{server.url}/v1/{path}", data)
    assert code == status, text
    assert message in text
    reply = client.completions.create(model=MODEL, prompt=PROMPTS[3], temperature=0, max_tokens=3)
    assert reply.choices[0].text == offline[1](PROMPTS[3], max_new_tokens=3)[1]


@pytest.mark.slow
def test_client_disconnecting_mid_stream_does_not_break_others(server, client, offline):
    import http.client
    from urllib.parse import urlsplit

    expected = offline[1](PROMPTS[1], max_new_tokens=6)[1]
    other = {}
    body = {"model": MODEL, "prompt": PROMPTS[2], "temperature": 0, "max_tokens": 200, "stream": True}
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=REQUEST_TIMEOUT_S)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream is running
    worker = threading.Thread(target=lambda: other.setdefault("text", client.completions.create(
        model=MODEL, prompt=PROMPTS[1], temperature=0, max_tokens=6).choices[0].text))
    worker.start()
    connection.sock.shutdown(2)  # the client goes away mid-stream
    connection.close()
    worker.join(REQUEST_TIMEOUT_S)
    assert other.get("text") == expected
    assert client.completions.create(model=MODEL, prompt=PROMPTS[1], temperature=0, max_tokens=6).choices[0].text == expected
    with urllib.request.urlopen(f"{server.url}/health", timeout=REQUEST_TIMEOUT_S) as health:
        assert health.status == 200


@pytest.mark.slow
def test_sigterm_stops_the_server_cleanly(server):
    """Runs last in the module: the fixture's server is stopped here."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 0
    time.sleep(0.2)
    assert "llm-int8 serve: stopped (SIGTERM)" in server.output()
