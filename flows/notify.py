"""Notifications: the webhook block and the automations of infra/automations.yaml on the Prefect server
(`distill notify --url URL`). Running it again replaces both: automations are matched by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

AUTOMATIONS = Path(__file__).resolve().parents[1] / "infra" / "automations.yaml"
BLOCK = "distill-notifications"
PLACEHOLDER = "WEBHOOK"


def setup_notifications(url: str, headers: dict[str, str] | None = None, path: Path = AUTOMATIONS) -> list[str]:
    """Save the webhook block (`allow_private_urls`: a receiver on the private network is the usual case) and
    create the automations, replacing those of the same names; their names."""
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    block_id = Webhook(method="POST", url=url, headers=headers or {}, allow_private_urls=True).save(
        BLOCK, overwrite=True
    )
    automations = [_with_block(a, str(block_id)) for a in yaml.safe_load(path.read_text())["automations"]]
    with get_client(sync_client=True) as client:
        existing = {a.name: a.id for a in client.read_automations()}
        for automation in automations:
            if automation["name"] in existing:
                client.delete_automation(existing[automation["name"]])
            client.create_automation(AutomationCore.model_validate(automation))
    return [a["name"] for a in automations]


def _with_block(automation: dict[str, Any], block_id: str) -> dict[str, Any]:
    actions = [
        {**action, "block_document_id": block_id} if action.get("block_document_id") == PLACEHOLDER else action
        for action in automation["actions"]
    ]
    return {**automation, "actions": actions}
