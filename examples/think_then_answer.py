"""Think first, then answer in a constrained format (the reasoning stays in the prompt).

python examples/think_then_answer.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import strata.lang as sl


@sl.function
def think_then_answer(s, question: str):
    s += sl.system("You solve arithmetic word problems.")
    s += sl.user(question)
    s += sl.assistant_begin()
    s += "Let me think step by step. "
    s += sl.gen("thinking", max_tokens=64, stop="\n\n", temperature=0)
    s += "\nSo the final answer is "
    s += sl.gen("answer", max_tokens=8, regex=r"[0-9]{1,4}", temperature=0)
    s += "."
    s += sl.assistant_end()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    args = ap.parse_args()
    sl.set_default_backend(sl.RuntimeEndpoint(args.url))
    s = think_then_answer.run(question="Tom has 3 apples and buys 4 more. How many apples?")
    assert s["answer"].isdigit()
    print(f"thinking: {s['thinking']!r}\nanswer: {s['answer']}")
    print(s.messages()[-1]["content"])


if __name__ == "__main__":
    main()
