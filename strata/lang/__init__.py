"""strata.lang: SGLang-style frontend programs (`@function`, `gen`, `select`, roles, fork).

import strata.lang as sl

@sl.function
def qa(s, question):
    s += sl.system("You are a helpful assistant.")
    s += sl.user(question)
    s += sl.assistant(sl.gen("answer", max_tokens=64, temperature=0))

sl.set_default_backend(sl.RuntimeEndpoint("http://127.0.0.1:30000"))
print(qa.run(question="What is a radix tree?")["answer"])
"""

from strata.lang.backend import RuntimeEndpoint, set_default_backend
from strata.lang.ir import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from strata.lang.program import ProgramState, Session, function, session

__all__ = [
    "ProgramState",
    "RuntimeEndpoint",
    "Session",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "function",
    "gen",
    "select",
    "session",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "user",
    "user_begin",
    "user_end",
]
