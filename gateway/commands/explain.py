"""``upload-gateway explain --channel C --role R FILE``: what the policy decides for FILE, and why.

For support staff answering "why was my file blocked?": it sniffs FILE exactly as the proxy does
(same sniffer, same ``uploads.sniff_bytes``), shows the policy for the channel and role with the
setting behind every limit, and the verdict with the gateway's own reason. The decision comes
from the same functions the request path calls, so it cannot drift from what the proxy does.

Exit 0 when the gateway would let the file through (in ``mode: report`` also a file the policy
would refuse: it is only counted), 1 when it would refuse it, 2 when FILE or the config cannot be
read. The file is judged as the only file of an upload request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from gateway.commands import add_config_argument
from gateway.config.loader import ConfigError, load_config
from gateway.config.model import Config, Role
from gateway.config.units import format_size
from gateway.errors import GatewayError, problem_body
from gateway.inspect.sniffer import Sniffer
from gateway.policy import rules
from gateway.policy.routes import channel_key


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain", help="say what the upload policy would decide for a file, and why"
    )
    p.add_argument("--channel", required=True, help="channel key or stream id (as in the URL)")
    p.add_argument("--role", required=True, choices=("agent", "customer"))
    p.add_argument("--name", help="file name as uploaded (default: FILE's own name)")
    p.add_argument("--type", dest="declared_type", help="the Content-Type the client declares")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("file", metavar="FILE")
    add_config_argument(p)
    p.set_defaults(func=run)


def explain(
    config: Config,
    channel: str,
    role: Role,
    path: str,
    name: str | None = None,
    declared_type: str | None = None,
) -> dict[str, Any]:
    """The whole answer as a JSON-able dict (``verdict``: accept, report or reject)."""
    policy = rules.effective_policy(config, channel_key(config, channel), role)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(config.uploads.sniff_bytes)
    filename = name or os.path.basename(path)
    facts = rules.FileFacts(filename, declared_type, Sniffer().sniff(head, filename), size)
    error = _judge(config, policy, facts)
    verdict = "accept"
    if error is not None:
        verdict = "reject" if rules.enforced(error, policy.mode) else "report"
    return {
        "file": {
            "name": facts.filename,
            "size": size,
            "declared_type": declared_type,
            "sniffed_type": facts.sniffed_type,
        },
        "policy": policy.as_dict(),
        "verdict": verdict,
        "reason": None if error is None else _reason(error),
    }


def _judge(
    config: Config, policy: rules.EffectivePolicy, facts: rules.FileFacts
) -> GatewayError | None:
    """What the proxy answers for FILE sent with its Content-Length: the request limit before
    the body, then the file's rules in the order the proxy meets them, and the system cap
    last (a role limit below it is crossed first). In ``mode: report`` the answer is the first
    refusal the mode does not waive, else the first it only counts."""
    found: list[GatewayError | None] = []
    if facts.size > config.limits.max_request_size:
        limit = config.limits.max_request_size
        found.append(
            GatewayError(
                "request_too_large",
                f"the file alone is over {format_size(limit)}",
                limit_bytes=limit,
                limit_source="limits.max_request_size",
            )
        )
    found.append(rules.judge_file(policy, facts))
    if facts.size > policy.system_cap:
        found.append(rules.file_too_large(rules.capped(policy), facts.filename))
    errors = [error for error in found if error is not None]
    enforced = [error for error in errors if rules.enforced(error, policy.mode)]
    return next(iter(enforced or errors), None)


def _reason(error: GatewayError) -> dict[str, Any]:
    body = problem_body(error, request_id="explain")
    body.pop("request_id", None)
    return body


def render(answer: dict[str, Any]) -> str:
    """The human-readable form, one fact per line, each limit with its setting."""
    f, p = answer["file"], answer["policy"]
    rows = [
        ("uploads enabled", "yes" if p["enabled"]["value"] else "no", p["enabled"]["source"]),
        ("max file size", _size(p["max_file_size"]["bytes"]), p["max_file_size"]["source"]),
        (
            "max request size",
            _size(p["max_request_size"]["bytes"]),
            p["max_request_size"]["source"],
        ),
        ("max files", str(p["max_files"]["value"]), p["max_files"]["source"]),
        (
            "allowed types",
            ", ".join(p["allowed_types"]["value"]) or "(none)",
            p["allowed_types"]["source"],
        ),
        ("mode", p["mode"]["value"], p["mode"]["source"]),
    ]
    lines = [
        f"file:         {f['name']} ({f['size']} bytes)",
        f"sniffed type: {f['sniffed_type']}",
    ]
    if f["declared_type"]:
        lines.append(f"declared:     {f['declared_type']}")
    lines += [f"channel:      {p['channel']}", f"role:         {p['role']}", "policy:"]
    lines += [f"  {label:<17} {value:<40} ({source})" for label, value, source in rows]
    reason = answer["reason"]
    if answer["verdict"] == "accept":
        lines.append("verdict:      ACCEPTED")
    else:
        head = (
            "REJECTED"
            if answer["verdict"] == "reject"
            else "WOULD BE REJECTED (mode report: let through and counted)"
        )
        lines.append(f"verdict:      {head}: {reason['status']} {reason['code']}")
        lines.append(f"reason:       {reason['detail']}")
    return "\n".join(lines)


def _size(num_bytes: int) -> str:
    return f"{format_size(num_bytes)} ({num_bytes} bytes)"


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, require_secrets=False)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    try:
        answer = explain(config, args.channel, args.role, args.file, args.name, args.declared_type)
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return 1 if answer["verdict"] == "reject" else 0
