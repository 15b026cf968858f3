"""A conditional branch on the output's variant.

``review`` returns an ``Approved`` or a ``Rejected``; each variant has its own routed edge (as
floxide's enum arms: ``review => { Approved(x) => [ship]; Rejected(x) => [notify] }``), and the
successor receives the variant itself.

    python examples/branching.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from floxide_grpc import Workflow, node


@dataclass
class Application:
    name: str
    score: int


@dataclass
class Approved:
    name: str
    limit: int


@dataclass
class Rejected:
    name: str
    reason: str


@node
def review(app: Application) -> Approved | Rejected:
    """Approve scores of 600 and above."""
    if app.score >= 600:
        return Approved(app.name, limit=app.score * 10)
    return Rejected(app.name, reason=f"score {app.score} is below 600")


@node
def open_account(approved: Approved) -> str:
    """Open the account with its limit."""
    return f"{approved.name}: account opened with a limit of {approved.limit}"


@node
def send_letter(rejected: Rejected) -> str:
    """Explain the refusal."""
    return f"{rejected.name}: refused, {rejected.reason}"


workflow = Workflow("branching", start=review)
workflow.route(review, {Approved: open_account, Rejected: send_letter})


async def main() -> None:
    for app in (Application("ada", 720), Application("bob", 540)):
        print(await workflow.run(app))


if __name__ == "__main__":
    asyncio.run(main())
