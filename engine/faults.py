"""Fault injection for tests: make the model runner fail one request or a whole step.

Never on in production. A server installs it only when MISTRAL_SERVE_FAULT_INJECTION=1 is
set in its environment (and logs a warning); tests in-process set ModelRunner.fault_hook.
Faults are chosen by request id, so a test picks its victim without touching the server:
  "...@fail-request:N..."  this request alone fails once it has N output tokens
                           (reported in ModelRunnerOutput.errors, like a per-request fault)
  "...@fail-step:N..."     the step that would sample this request's token N raises, so every
                           request of that step fails (like an exception from the forward pass)
"""

from __future__ import annotations

import os
import re
from typing import Optional

from scheduler.output import SchedulerOutput

ENV_VAR = "MISTRAL_SERVE_FAULT_INJECTION"
_MARK = re.compile(r"@fail-(request|step):(\d+)")


class InjectedFault(RuntimeError):
    """The whole-step fault raised by request_id_faults."""


def enabled_by_env() -> bool:
    """True when the environment asks for fault injection (tests only)."""
    return os.environ.get(ENV_VAR, "") == "1"


def request_id_faults(sched: SchedulerOutput) -> Optional[dict[str, str]]:
    """A ModelRunner.fault_hook that fails the requests whose ids carry a @fail- mark."""
    failed = {}
    for s in sched.scheduled:
        m = _MARK.search(s.request_id)
        if m is None or not s.sample or s.num_output_tokens < int(m.group(2)):
            continue
        if m.group(1) == "step":
            raise InjectedFault(f"injected step fault (request {s.request_id})")
        failed[s.request_id] = f"injected request fault after {s.num_output_tokens} tokens"
    return failed
