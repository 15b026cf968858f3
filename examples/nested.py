"""A nested workflow used as one node of another.

``clean_text`` (strip, then lowercase) is a workflow of its own; ``report`` runs it as its first
node (floxide's ``CompositeNode``), then counts the words of its output.

    python examples/nested.py
"""

from __future__ import annotations

import asyncio

from floxide_grpc import Workflow, node, subworkflow


@node
def strip(text: str) -> str:
    """Trim the ends."""
    return text.strip()


@node
def lower(text: str) -> str:
    """Lowercase everything."""
    return text.lower()


clean_text = Workflow("clean_text", start=strip)
clean_text.edge(strip, lower)


@node
def count_words(text: str) -> dict[str, int]:
    """Count each word."""
    counts: dict[str, int] = {}
    for word in text.split():
        counts[word] = counts.get(word, 0) + 1
    return counts


clean = subworkflow(clean_text, name="clean")
workflow = Workflow("report", start=clean)
workflow.edge(clean, count_words)


async def main() -> None:
    print(await clean_text.run("  Hello World  "))
    print(await workflow.run("  The cat saw THE dog  "))


if __name__ == "__main__":
    asyncio.run(main())
