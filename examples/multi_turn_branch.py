"""Multi-turn chat that branches on the model's answer (select), then continues the chat.

python examples/multi_turn_branch.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import strata.lang as sl


@sl.function
def triage(s, question: str):
    s += sl.system("You are a careful assistant. Answer briefly.")
    s += sl.user(f"Is this question about programming? Answer yes or no.\n{question}")
    s += sl.assistant(sl.select("is_code", choices=["yes", "no"]))
    if s["is_code"] == "yes":
        s += sl.user("Which programming language is it about? One word.")
        s += sl.assistant(sl.gen("topic", max_tokens=8, stop="\n", temperature=0))
    else:
        s += sl.user("Which everyday subject is it about? One word.")
        s += sl.assistant(sl.gen("topic", max_tokens=8, stop="\n", temperature=0))
    s += sl.user("Now answer the question in one sentence.")
    s += sl.assistant(sl.gen("answer", max_tokens=48, temperature=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    args = ap.parse_args()
    sl.set_default_backend(sl.RuntimeEndpoint(args.url))
    for q in ["How do I reverse a list in Python?", "How long should I boil an egg?"]:
        s = triage.run(question=q)
        assert s["is_code"] in ("yes", "no")
        assert len(s.messages()) == 7  # system + three user/assistant exchanges
        print(f"{q}\n  is_code={s['is_code']} topic={s['topic']!r}\n  answer={s['answer']!r}")


if __name__ == "__main__":
    main()
