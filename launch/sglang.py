"""SGLang's launch_server flags, served by `strata serve` (`python -m strata.launch_server`)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from launch.cli import main as cli_main

# SGLang flags with no meaning here (yet): accepted, with a warning naming each, so scripts
# run unchanged. The rest (--context-length, --mem-fraction-static, --random-seed,
# --schedule-policy, --chunked-prefill-size, --max-running-requests, --hicache-*, ...) are
# strata serve's own.
IGNORED_FLAGS = {
    "--trust-remote-code": 0,
    "--enable-torch-compile": 0,
    "--tokenizer-path": 1,
    "--kv-cache-dtype": 1,
}
# SGLang's --attention-backend values that name one of ours; the others (flashinfer, fa3,
# ...) warn and leave the choice to strata
ATTENTION_BACKENDS = {
    "triton": "triton",
    "torch_native": "torch",
    "torch": "torch",
    "cpu": "cpu",
    "auto": "auto",
}


def translate(argv: Sequence[str]) -> list[str]:
    out: list[str] = ["serve"]
    args = list(argv)
    i = 0
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        if flag in IGNORED_FLAGS:
            takes = IGNORED_FLAGS[flag] if "=" not in args[i] else 0
            logging.getLogger("strata").warning("ignoring SGLang flag %s", args[i])
            i += 1 + takes
            continue
        if flag == "--attention-backend":
            if "=" in args[i]:
                value, i = args[i].split("=", 1)[1], i + 1
            else:
                value, i = (args[i + 1] if i + 1 < len(args) else ""), i + 2
            if value in ATTENTION_BACKENDS:
                out += ["--attention-backend", ATTENTION_BACKENDS[value]]
            else:
                logging.getLogger("strata").warning(
                    "ignoring --attention-backend %s (strata has %s)",
                    value,
                    ", ".join(sorted(set(ATTENTION_BACKENDS.values()))),
                )
            continue
        out.append(args[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(translate(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
