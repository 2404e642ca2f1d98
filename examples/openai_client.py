"""Drive `hetero-sched serve` with the official OpenAI Python client (pip install openai).

    python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1] [--model tiny]

Non-streaming and streaming, completions and chat; prints the text, the usage and the time to
first token the client saw. The server needs no API key (the client insists on one: any
string will do). Outputs end at max_tokens: the byte-level vocabulary has no EOS.
"""

from __future__ import annotations

import argparse
import time

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="default: the first model the server lists")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id

    # Non-streaming completion: the whole text and the usage in one reply.
    done = client.completions.create(model=model, prompt="The heterogeneous cluster", max_tokens=16)
    print(f"completion: {done.choices[0].text!r} ({done.choices[0].finish_reason}); usage {done.usage.model_dump()}")

    # Streaming chat: tokens as the decode group reports them; usage in the last chunk.
    start = time.perf_counter()
    first = None
    text = []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=32, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "min_tokens": 32})       # fixed output length, as benchmarks ask
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            print(f"chat (streamed): {''.join(text)!r}; usage {chunk.usage.model_dump(exclude_none=True)}; "
                  f"TTFT {(first - start) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
