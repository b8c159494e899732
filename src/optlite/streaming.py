"""Streamers: receive token ids from `generate` as they are produced and turn them into text.

`generate(..., streamer=s)` calls `s.put(prompt_ids)` once, `s.put(new_ids)` after every step, then `s.end()`,
exactly like transformers' streamers, so either library's streamer works with either `generate`. When generation
fails or is interrupted, it calls `s.fail(error)` instead (`s.end()` for a streamer without `fail`), so a reader
never waits for text that will not come and a reused streamer starts clean.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from queue import Queue
from typing import Any, TypeVar

import torch

REPLACEMENT = "\ufffd"  # what a decoder shows for the bytes of a character that is not complete yet


class BaseStreamer:
    """What `generate` needs from a streamer: `put(token_ids)` for each new piece, `end()` once at the end."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def ends_stream_on_error(generate: _Fn) -> _Fn:
    """Wrap a generate function (taking `streamer=` by keyword) so that an exception or KeyboardInterrupt, raised
    anywhere in it, reaches its streamer (`fail(error)`, or `end()`) before propagating.

    Example:
        >>> @ends_stream_on_error
        ... def generate(model, input_ids, *, streamer=None): ...
    """

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return generate(*args, **kwargs)
        except BaseException as error:
            _notify(kwargs.get("streamer"), error)
            raise

    return wrapper  # type: ignore[return-value]


def _notify(streamer: Any, error: BaseException) -> None:
    with contextlib.suppress(Exception):  # a failing streamer must not hide the generation's own error
        if hasattr(streamer, "fail"):
            streamer.fail(error)
        elif hasattr(streamer, "end"):
            streamer.end()


def _is_cjk(char: str) -> bool:
    """CJK ideographs are words on their own: they can be shown without waiting for a space."""
    cp = ord(char)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
            or 0x2F800 <= cp <= 0x2FA1F)


def printable_prefix(text: str) -> tuple[int, bool]:
    """How much of the text decoded so far is final: (end index, whether to start a fresh decode after it).

    A trailing U+FFFD is a character whose bytes have not all arrived, so it is held back. Otherwise text is
    released up to the last space (the word after it may still grow), all of it after a newline or a CJK
    character — transformers' TextStreamer rule.

    Example:
        >>> printable_prefix("Hello wor"), printable_prefix("line\\n"), printable_prefix("ab \\ufffd")
        ((6, False), (5, True), (3, False))
    """
    if text.endswith("\n"):
        return len(text), True
    stable = text.rstrip(REPLACEMENT)
    if stable and _is_cjk(stable[-1]):
        return len(stable), False
    return stable.rfind(" ") + 1, False


class TextStreamer(BaseStreamer):
    """Print the text as it is generated, a word at a time (transformers' TextStreamer, plus: never a half
    multi-byte character). The pieces printed add up to `tokenizer.decode(ids, **decode_kwargs)`, then a newline.

    Batch size 1 only. `skip_prompt=True` leaves out the prompt; `decode_kwargs` (e.g. `skip_special_tokens=True`)
    go to `tokenizer.decode`.

    Example:
        >>> import contextlib, io
        >>> streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        >>> with contextlib.redirect_stdout(io.StringIO()) as printed:  # to show what it printed
        ...     out = model.generate(**tokenizer("Hello,", return_tensors="pt"), streamer=streamer, max_new_tokens=6)
        >>> printed.getvalue() == tokenizer.decode(out[0, 3:], skip_special_tokens=True) + "\\n"
        True
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        """Take the next token ids ((1, n) or (n,)) and release whatever text became final."""
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError(f"{type(self).__name__} streams one sequence; got a batch of {value.shape[0]}")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(value.tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        end, restart = printable_prefix(text)
        printable = text[self.print_len:end] if end > self.print_len else ""
        if restart:
            self.token_cache, self.print_len = [], 0
        else:
            self.print_len = max(self.print_len, end)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Release the rest of the text and signal the end of the stream."""
        printable = ""
        if self.token_cache:
            printable = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len:]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def fail(self, error: BaseException) -> None:
        """Generation stopped with `error`: drop the text held back, so the next stream starts clean."""
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Print the new text at once (and a newline at the end of the stream)."""
        print(text, flush=True, end="\n" if stream_end else "")


class TextIteratorStreamer(TextStreamer):
    """Hand the text to another thread: iterate over the streamer while `generate` runs in a thread.

    When generation fails or is interrupted, the reader gets a `GenerationError` (its `__cause__` is the original
    error) after the text released so far. `timeout` (seconds) bounds each wait for the next piece (queue.Empty is
    raised), for a generate that can hang in other ways. The pieces join up to exactly the decoded text (no
    trailing newline).

    Example:
        >>> from threading import Thread
        >>> ids = tokenizer("Hello,", return_tensors="pt").input_ids
        >>> streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
        >>> thread = Thread(target=model.generate, kwargs=dict(input_ids=ids, streamer=streamer, max_new_tokens=6))
        >>> thread.start()
        >>> text = "".join(streamer)  # each piece as soon as it is decoded
        >>> thread.join()
    """

    _STOP = object()

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue = Queue()
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self._STOP, timeout=self.timeout)

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self.text_queue.put(_Failure(error), timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self._STOP:
            raise StopIteration
        if isinstance(value, _Failure):
            raise GenerationError(f"generation stopped: {type(value.error).__name__}: {value.error}") from value.error
        return value


class GenerationError(RuntimeError):
    """Raised to a TextIteratorStreamer's reader when the generation it was reading failed or was interrupted."""


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
