"""A linear chain with a retried step and a fallback.

validate -> charge -> ship. The payment gateway times out on the first try, so ``charge`` is
retried (its policy allows 3 attempts); a declined card aborts without retry, and the fallback
edge sends the order (charge's original input) to ``decline`` instead. An audit trail is kept in
the context (an APPEND field).

    python examples/order_chain.py
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated

from floxide_grpc import (
    Abort,
    Backoff,
    LocalRunner,
    Merge,
    NodeContext,
    RetryPolicy,
    Workflow,
    node,
)


@dataclass
class Order:
    id: int
    amount: float
    card: str


@dataclass
class Receipt:
    order_id: int
    status: str


@dataclass
class Audit:
    trail: Annotated[list[str], Merge.APPEND] = field(default_factory=list)


@node
def validate(ctx: NodeContext, order: Order) -> Order | Abort:
    """Refuse orders that cost nothing."""
    if order.amount <= 0:
        return Abort(f"order {order.id}: amount must be positive", non_retryable=True)
    ctx.append("trail", f"validated {order.id}")
    return order


@node(
    retry=RetryPolicy(
        max_attempts=3,
        initial_backoff=timedelta(milliseconds=5),
        backoff=Backoff.FIXED,
        jitter=False,
    )
)
async def charge(ctx: NodeContext, order: Order) -> Order | Abort:
    """Charge the card; the gateway times out on the first attempt."""
    if order.card == "declined":
        return Abort(f"card declined for order {order.id}", non_retryable=True)
    if ctx.attempt == 1:
        raise ConnectionError("payment gateway timed out")
    ctx.append("trail", f"charged {order.id} on attempt {ctx.attempt}")
    return order


@node
def ship(ctx: NodeContext, order: Order) -> Receipt:
    """Ship a paid order."""
    ctx.append("trail", f"shipped {order.id}")
    return Receipt(order.id, "shipped")


@node
def decline(ctx: NodeContext, order: Order) -> Receipt:
    """Tell the customer the payment failed."""
    ctx.append("trail", f"declined {order.id}")
    return Receipt(order.id, "declined")


workflow = Workflow("order_chain", start=validate, context=Audit)
workflow.edge(validate, charge).edge(charge, ship).on_failure(charge, decline)


async def main() -> None:
    for order in (Order(1, 25.0, "visa"), Order(2, 10.0, "declined")):
        runner = LocalRunner(workflow)
        receipt = await runner.run(order)
        print(f"order {order.id}: {receipt.status}")
        print(f"  trail: {runner.context['trail']}")
        print(f"  failed attempts: {[(e.node, e.attempt, e.message) for e in runner.errors]}")


if __name__ == "__main__":
    asyncio.run(main())
