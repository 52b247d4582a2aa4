"""The engine loop: one thread owns the LLM and steps it for every client of the server.

OS idea: the kernel's run loop. Many processes make system calls, but one scheduler decides what
runs next and runs it, a time slice at a time; a process that has nothing to do sleeps until an
event wakes it, and so does the kernel's idle loop. KV counterpart: vLLM's AsyncLLMEngine (paper
section 4.5 and 5): the HTTP handlers only post requests into an inbox; one loop admits them with
add_request, runs llm.step() (iteration-level batching across every connection) and posts each
request's progress back to the handler that waits for it. The asyncio event loop never runs a model
step, so it stays free to accept connections and stream tokens while the model computes.

    handler --Submission--> inbox --> [engine thread: add_request / abort_request / step] --Event--> handler
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from minipaged.outputs import RequestOutput
from minipaged.serving.metrics import EngineSnapshot, snapshot

ACCEPTED, PROGRESS, FINISHED, ERROR = "accepted", "progress", "finished", "error"


@dataclass
class Event:
    """What the engine loop tells a handler about its request.

    kind is ACCEPTED (the engine queued it), PROGRESS (a streaming request's output so far),
    FINISHED (the final output) or ERROR (status and message: the request is gone).
    """

    kind: str
    output: RequestOutput | None = None
    status: int = 200
    message: str = ""


@dataclass(eq=False)
class Submission:
    """One request on its way to the engine, and the way back to its handler.

    Attributes:
        prompt, params: what LLM.add_request takes.
        stream: post PROGRESS events after each step (else only the final output).
        deliver: called on the engine thread with each Event; it must not block (the server's
            deliver hands the event to the handler's asyncio.Queue with call_soon_threadsafe).
        request_id: the engine's id, set once it is accepted.
    """

    prompt: str | dict
    params: object
    stream: bool
    deliver: Callable[[Event], None]
    request_id: str | None = None
    done: bool = field(default=False)


class EngineLoop:
    """A background thread that drains an inbox of submissions and aborts, and steps the LLM.

    Args:
        llm: the engine; from start() to stop() only this thread calls it.

    Attributes:
        snapshot: the figures /metrics reports, replaced (never mutated) after each step.
        num_finished, num_aborted, num_failed: requests finished, aborted, and lost to a step error.
        prompt_tokens, generation_tokens: the tokens of the finished requests, prompt and generated.
    """

    def __init__(self, llm) -> None:
        self.llm = llm
        self._inbox: deque[tuple[str, Submission]] = deque()
        self._wakeup = threading.Condition()
        # request_id -> its submission; the engine knows it
        self._active: dict[str, Submission] = {}
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name="minipaged-engine-loop", daemon=True
        )
        self.num_finished = self.num_aborted = self.num_failed = 0
        self.prompt_tokens = self.generation_tokens = 0  # of the finished requests
        self.last_error: BaseException | None = None
        self.snapshot: EngineSnapshot = snapshot(llm, self)

    # ---- called from the server (any thread) ---------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the loop runs (what /health reports)."""
        return self._thread.is_alive() and not self._stopping

    def submit(self, submission: Submission) -> None:
        """Queue a request for the engine; its events come back through submission.deliver."""
        self._post("add", submission)

    def abort(self, submission: Submission) -> None:
        """Abort a request (its client went away): the engine frees its blocks. Idempotent."""
        self._post("abort", submission)

    def stop(self, timeout: float = 30.0) -> None:
        """Abort every request, end the thread and wait for it."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _post(self, kind: str, submission: Submission) -> None:
        with self._wakeup:
            self._inbox.append((kind, submission))
            self._wakeup.notify()

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # sleep until there is something to do: no busy-wait when idle
            with self._wakeup:
                while (
                    not self._inbox
                    and not self._stopping
                    and not self.llm.has_unfinished_requests()
                ):
                    self._wakeup.wait()
                if self._stopping:
                    break
                work = list(self._inbox)
                self._inbox.clear()
            try:
                for kind, submission in work:
                    self._add(submission) if kind == "add" else self._abort(submission)
                if self.llm.has_unfinished_requests():
                    self._step()
            # a bug, not a model error: fail what is in flight, go on serving
            except Exception as error:
                self.last_error = error
                self._fail_all(error)
            self.snapshot = snapshot(self.llm, self)
        self._shutdown()

    def _add(self, submission: Submission) -> None:
        if submission.done:  # aborted before it reached the engine
            return
        try:
            submission.request_id = self.llm.add_request(
                submission.prompt, submission.params
            )
        # can never be served: the message names the field
        except (ValueError, TypeError) as error:
            self._finish(submission, Event(ERROR, status=400, message=str(error)))
            return
        except Exception as error:  # a bug in the engine must not kill the loop
            self._finish(
                submission,
                Event(ERROR, status=500, message=f"{type(error).__name__}: {error}"),
            )
            return
        self._active[submission.request_id] = submission
        submission.deliver(Event(ACCEPTED))

    def _abort(self, submission: Submission) -> None:
        if submission.done:
            return
        submission.done = True
        if submission.request_id is not None:
            self.llm.abort_request(submission.request_id)
            del self._active[submission.request_id]
        self.num_aborted += 1

    def _step(self) -> None:
        try:
            finished = self.llm.step()
        except Exception as error:  # a model error must not kill the server
            self.last_error = error
            self._fail_forgotten(error)
            return
        done = [
            (self._active.pop(out.request_id), out)
            for out in finished
            if out.request_id in self._active
        ]
        for _, output in done:
            self.num_finished += 1
            self.prompt_tokens += len(output.prompt_token_ids)
            self.generation_tokens += sum(len(c.token_ids) for c in output.outputs)
        # before the answers: a client then sees its request counted
        self.snapshot = snapshot(self.llm, self)
        for submission, output in done:
            self._finish(submission, Event(FINISHED, output))
        for request_id, submission in self._active.items():
            # the output so far: the handler sends what its client has not seen
            if submission.stream:
                output = self.llm.request_output(request_id)
                if output is not None:
                    submission.deliver(Event(PROGRESS, output))

    def _fail_forgotten(self, error: Exception) -> None:
        """After a failed step: the requests the engine no longer knows get an error; others go on."""
        for request_id in list(self._active):
            if self.llm.request_output(request_id) is None:
                submission = self._active.pop(request_id)
                self.num_failed += 1
                message = f"the engine failed while running this request: {type(error).__name__}: {error}"
                self._finish(submission, Event(ERROR, status=500, message=message))

    def _fail_all(self, error: Exception) -> None:
        for request_id, submission in list(self._active.items()):
            self.llm.abort_request(request_id)
            self.num_failed += 1
            self._finish(
                submission,
                Event(ERROR, status=500, message=f"{type(error).__name__}: {error}"),
            )
        self._active.clear()

    def _finish(self, submission: Submission, event: Event) -> None:
        submission.done = True
        submission.deliver(event)

    def _shutdown(self) -> None:
        """Abort what is left, so every block is free, and tell the waiting handlers."""
        for _, submission in self._inbox:
            if submission.request_id is None and not submission.done:
                self._finish(
                    submission,
                    Event(ERROR, status=503, message="the server is shutting down"),
                )
        self._inbox.clear()
        for request_id, submission in list(self._active.items()):
            self.llm.abort_request(request_id)
            self.num_aborted += 1
            self._finish(
                submission,
                Event(ERROR, status=503, message="the server is shutting down"),
            )
        self._active.clear()
        self.snapshot = snapshot(self.llm, self)
