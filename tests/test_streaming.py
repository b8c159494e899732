"""Streamers and generate_text: text released as it becomes final, never half a character, adding up to exactly the
decoded text; string-level generation equal to tokenizing, generating and decoding by hand (and to transformers)."""

import functools
import threading
from pathlib import Path

import pytest
import torch
from tiny import make_pair

from optlite import TextIteratorStreamer, TextStreamer, generate_text
from optlite.streaming import printable_prefix

TOKENIZER_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "opt_tokenizer"
TEXT = "héllo wörld 中文字 ok\nnext 😀 line €5, naïve café done"


pytestmark = pytest.mark.usefixtures("one_thread")


class ByteTokenizer:
    """One token per UTF-8 byte: the harshest case for a streamer, as most characters span several tokens."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(streamer, ids, prompt=None):
    if prompt is not None:
        streamer.put(torch.tensor([prompt]))
    for t in ids:
        streamer.put(torch.tensor([t]))
    streamer.end()


def test_printable_prefix():
    assert printable_prefix("Hello wor") == (6, False)
    assert printable_prefix("Hello world\n") == (12, True)
    assert printable_prefix("Hello \ufffd") == (6, False)
    assert printable_prefix("中文") == (2, False)
    assert printable_prefix("中\ufffd") == (1, False)  # the second character is still incomplete
    assert printable_prefix("") == (0, False)


def test_byte_streaming_never_splits_a_character_and_adds_up():
    streamer = TextIteratorStreamer(ByteTokenizer())
    stream(streamer, list(TEXT.encode()))
    chunks = list(streamer)
    assert "".join(chunks) == TEXT
    assert len(chunks) > 5 and not any("\ufffd" in c for c in chunks)


def test_invalid_bytes_are_released_at_the_end():
    data = b"ab \xff cd \xe4\xb8"  # a stray byte, and a character cut short by the end of generation
    streamer = TextIteratorStreamer(ByteTokenizer())
    stream(streamer, list(data))
    assert "".join(streamer) == data.decode("utf-8", errors="replace")


def test_text_streamer_prints_as_it_goes(capsys):
    streamer = TextStreamer(ByteTokenizer(), skip_prompt=True)
    streamer.put(torch.tensor([list(b"prompt ")]))  # (1, n): the prompt, skipped
    streamer.put(torch.tensor(list(b"first ")))
    assert capsys.readouterr().out == "first "  # already printed, before the end
    for t in "sécond 中 😀".encode():
        streamer.put(torch.tensor([t]))
    streamer.end()
    assert capsys.readouterr().out == "sécond 中 😀\n"
    with pytest.raises(ValueError, match="one sequence"):
        streamer.put(torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# With the real OPT tokenizer and a small model of OPT's vocabulary
# ---------------------------------------------------------------------------------------------------------------------


@functools.cache
def tokenizer():
    if not TOKENIZER_DIR.is_dir():
        pytest.skip(f"no OPT tokenizer files at {TOKENIZER_DIR}")
    import transformers

    return transformers.GPT2Tokenizer.from_pretrained(str(TOKENIZER_DIR))


@functools.cache
def models():
    """(transformers, optlite) with the same random weights and OPT's 50272-token vocabulary."""
    return make_pair("OPTForCausalLM", "pre_ln", vocab_size=50272, max_position_embeddings=64, seed=1)


def test_real_tokenizer_streaming_adds_up_to_decode():
    tok = tokenizer()
    ids = tok(TEXT)["input_ids"]
    assert ids[0] == tok.bos_token_id
    streamer = TextIteratorStreamer(tok, skip_special_tokens=True)
    stream(streamer, ids)
    chunks = list(streamer)
    assert "".join(chunks) == tok.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in c for c in chunks)


def test_iterator_streamer_from_another_thread():
    tok, (_, model) = tokenizer(), models()
    enc = tok("A photo of", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}
    kwargs = dict(**enc, streamer=streamer, max_new_tokens=12, eos_token_id=None)
    thread = threading.Thread(target=lambda: result.update(out=model.generate(**kwargs)))
    thread.start()
    text = "".join(streamer)
    thread.join()
    new = result["out"][0, enc["input_ids"].shape[1]:]
    assert len(new) == 12 and text == tok.decode(new, skip_special_tokens=True)


def test_text_streamer_with_generate_and_generate_text(capsys):
    tok, (_, model) = tokenizer(), models()
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    text = generate_text(model, tok, "Hello, my dog is", max_new_tokens=10, streamer=streamer)
    assert capsys.readouterr().out == text + "\n"
    with pytest.raises(ValueError, match="one sequence"):
        generate_text(model, tok, "Hi", do_sample=True, num_return_sequences=2, streamer=streamer)


def test_generate_text_matches_tokenize_generate_decode_and_transformers():
    tok, (ref, model) = tokenizer(), models()
    texts = ["Hello, my dog is cute", "A photo of", "This is"]
    seen = []
    forward = model.forward
    model.forward = lambda *a, **k: (seen.append(a[0]), forward(*a, **k))[1]
    try:
        batch = generate_text(model, tok, texts, max_new_tokens=8)
    finally:
        del model.forward
    prefill = seen[0]  # left-padded, one </s> each, never two
    for row, text in zip(prefill.tolist(), texts, strict=True):
        real = [t for t in row if t != tok.pad_token_id]
        assert real == tok(text)["input_ids"] and real[:2].count(tok.bos_token_id) == 1
    enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    ref_out = ref.generate(**enc, max_new_tokens=8)
    assert batch == tok.batch_decode(ref_out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert batch == [generate_text(model, tok, t, max_new_tokens=8) for t in texts]  # left padding changes nothing
    assert tok.padding_side == "right"  # the caller's tokenizer is left as it was
    beams = generate_text(model, tok, texts[:2], max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert [len(b) for b in beams] == [2, 2] and all(isinstance(s, str) for b in beams for s in b)
    one = generate_text(model, tok, "Hi", max_new_tokens=5, do_sample=True, num_return_sequences=3,
                        generator=torch.Generator().manual_seed(0))
    assert isinstance(one, list) and len(one) == 3


class FailAfter:
    """A forward hook that raises `error` on the model's n-th call (a crash or Ctrl-C in the middle of generate)."""

    def __init__(self, model, n: int, error: BaseException):
        self.calls, self.n, self.error = 0, n, error
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.n:
            raise self.error


def read_in_thread(streamer) -> dict:
    """Read the streamer in a daemon thread; the caller checks it finished (a hang shows as a timeout)."""
    got: dict = {"chunks": []}

    def read():
        try:
            for chunk in streamer:
                got["chunks"].append(chunk)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            got["error"] = e

    got["thread"] = threading.Thread(target=read, daemon=True)
    got["thread"].start()
    return got


@pytest.mark.parametrize("error", [RuntimeError("out of memory"), KeyboardInterrupt()],
                         ids=["exception", "keyboard interrupt"])
def test_iterator_reader_gets_the_error_when_generation_stops(error):
    tok, (_, model) = tokenizer(), models()
    enc = tok("A photo of", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True)  # no timeout: a lost end would hang the reader
    got = read_in_thread(streamer)
    hook = FailAfter(model, 6, error)
    try:
        with pytest.raises(type(error)):
            model.generate(**enc, streamer=streamer, max_new_tokens=12, eos_token_id=None)
    finally:
        hook.handle.remove()
    got["thread"].join(timeout=30)
    assert not got["thread"].is_alive(), "the reader still waits"
    assert type(got["error"]).__name__ == "GenerationError" and got["error"].__cause__ is error
    assert type(error).__name__ in str(got["error"])


def test_iterator_reader_gets_the_error_of_a_refused_call():
    tok, (_, model) = tokenizer(), models()
    streamer = TextIteratorStreamer(tok)
    got = read_in_thread(streamer)
    with pytest.raises(TypeError):
        model.generate(**tok("Hi", return_tensors="pt"), streamer=streamer, no_such_setting=1)
    got["thread"].join(timeout=30)
    assert not got["thread"].is_alive() and isinstance(got["error"].__cause__, TypeError)


class Collect(TextStreamer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text + ("\n" if stream_end else "")


def test_a_reused_text_streamer_prints_nothing_of_an_interrupted_run():
    tok, (_, model) = tokenizer(), models()
    enc = tok("Hello, my dog is", return_tensors="pt")
    kwargs = dict(max_new_tokens=10, eos_token_id=None)
    fresh = Collect(tok, skip_prompt=True)
    model.generate(**enc, streamer=fresh, **kwargs)
    reused = Collect(tok, skip_prompt=True)
    hook = FailAfter(model, 4, KeyboardInterrupt())
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(**tok("A photo of", return_tensors="pt"), streamer=reused, **kwargs)
    finally:
        hook.handle.remove()
    reused.text = ""
    model.generate(**enc, streamer=reused, **kwargs)
    assert reused.text == fresh.text and fresh.text.strip()
