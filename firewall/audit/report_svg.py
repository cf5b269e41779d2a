"""The data-flow diagram (PCI DSS 1.2.3 / 1.2.4) as inline SVG.

Graphviz ``dot`` draws it when installed (Debian's graphviz); otherwise a small
built-in column layout does, so the report never depends on the package.
The diagram is built from the report dict, never from raw events: it shows
only facts that report.json also carries.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

MAX_NODES = 60  # beyond this only the CDE's neighbourhood is drawn, so the page stays legible
MAX_EDGES = 120  # and beyond this only the busiest CDE flows (dot's layout time grows fast with edges)
MAX_LABELS = 4
WORLD_NODE = "world"

SCOPE_STYLE = {  # scope -> (cluster title, fill, border)
    "cde": ("Cardholder-data environment (CDE)", "#fde2e1", "#c0392b"),
    "connected": ("Connected to the CDE", "#fff4d6", "#b7950b"),
    "out-of-scope": ("Out of scope", "#eef1f4", "#7f8c8d"),
    "world": ("Outside the cluster", "#ffffff", "#7f8c8d"),
}
ALLOW_COLOR, DENY_COLOR, MONITOR_COLOR = "#1e6f3d", "#c0392b", "#d35400"


@dataclass(slots=True)
class Edge:
    src: str
    dst: str
    kind: str  # allow | deny | would-deny
    labels: set[str] = field(default_factory=set)
    count: int = 0


@dataclass(slots=True)
class Graph:
    nodes: dict[str, tuple[str, str]]  # id -> (scope, label)
    edges: list[Edge]
    note: str | None = None


def build_graph(report: dict[str, Any]) -> Graph:
    """Workloads grouped by scope; world addresses folded into one node; flows aggregated per pair."""
    nodes: dict[str, tuple[str, str]] = {}
    for w in report["inventory"]["workloads"]:
        nodes[w["id"]] = (w["scope"], f"{w['name']}\n{w['namespace']} ({w['pod_count']} pods)")
    edges: dict[tuple[str, str, str], Edge] = {}
    world_used = False
    for f in report["flows"]:
        src, dst = f["src"], f["dst"]
        if "world:?" in (src, dst) or (src.startswith("world:") and dst.startswith("world:")):
            continue  # a record without addresses, or outside-to-outside: nothing to draw
        if src.startswith("world:"):
            src, world_used = WORLD_NODE, True
        if dst.startswith("world:"):
            dst, world_used = WORLD_NODE, True
        kind = "allow" if f["verdict"] == "allow" else ("deny" if f["enforced"] else "would-deny")
        e = edges.setdefault((src, dst, kind), Edge(src, dst, kind))
        e.count += f["count"]
        e.labels.add(f"{f['port']}/{f['app_proto']}" if f["app_proto"] not in ("", "unknown")
                     else f"{f['port']}/{f['proto'].lower()}")
    if world_used:
        nodes[WORLD_NODE] = ("world", f"outside the cluster\n({report['inventory']['external_addresses']} addresses)")
    for e in edges.values():
        for n in (e.src, e.dst):
            nodes.setdefault(n, ("out-of-scope", n))
    g = Graph(nodes, sorted(edges.values(), key=lambda e: (e.src, e.dst, e.kind)))
    if len(nodes) > MAX_NODES or len(g.edges) > MAX_EDGES:
        cde = {n for n, (s, _) in nodes.items() if s == "cde"}
        keep_edges = [e for e in g.edges if e.src in cde or e.dst in cde]
        note = f"{len(nodes)} workloads, {len(g.edges)} flow groups: only flows touching the CDE are drawn"
        if len(keep_edges) > MAX_EDGES:
            keep_edges = sorted(keep_edges, key=lambda e: -e.count)[:MAX_EDGES]
            note += f" (the {MAX_EDGES} busiest; all flows are listed in the appendix and report.json)"
        keep = cde | {e.src for e in keep_edges} | {e.dst for e in keep_edges}
        g = Graph({n: v for n, v in nodes.items() if n in keep}, keep_edges, note=note)
    return g


def _edge_label(e: Edge) -> str:
    labels = sorted(e.labels)
    text = ", ".join(labels[:MAX_LABELS]) + (f" +{len(labels) - MAX_LABELS}" if len(labels) > MAX_LABELS else "")
    return f"{text} ({e.count})" if e.kind == "allow" else f"DENIED {text} ({e.count})"


# --------------------------------------------------------------------------- graphviz


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(g: Graph) -> str:
    ids = {n: f"n{i}" for i, n in enumerate(sorted(g.nodes))}
    lines = ["digraph palisade {", "  rankdir=LR; compound=true; nodesep=0.35; ranksep=1.1;",
             '  graph [fontname="Helvetica", fontsize=12];',
             '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", fontname="Helvetica", fontsize=11];',
             '  edge [fontname="Helvetica", fontsize=9];']
    for scope in ("world", "out-of-scope", "connected", "cde"):
        members = [n for n, (s, _) in g.nodes.items() if s == scope]
        if not members:
            continue
        title, fill, border = SCOPE_STYLE[scope]
        lines.append(f"  subgraph cluster_{scope.replace('-', '_')} {{")
        lines.append(f'    label={_q(title)}; style="filled,rounded"; fillcolor="{fill}"; color="{border}";')
        for n in sorted(members):
            lines.append(f"    {ids[n]} [label={_q(g.nodes[n][1])}];")
        lines.append("  }")
    other = [n for n, (s, _) in g.nodes.items() if s not in SCOPE_STYLE]
    for n in sorted(other):
        lines.append(f"  {ids[n]} [label={_q(g.nodes[n][1])}];")
    for e in g.edges:
        if e.kind == "allow":
            style = f'color="{ALLOW_COLOR}", fontcolor="{ALLOW_COLOR}", penwidth=1.6'
        else:
            color = DENY_COLOR if e.kind == "deny" else MONITOR_COLOR
            style = f'color="{color}", fontcolor="{color}", style=dashed, arrowhead=tee'
        lines.append(f"  {ids[e.src]} -> {ids[e.dst]} [label={_q(_edge_label(e))}, {style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_svg(dot_src: str, timeout: float = 30.0) -> str | None:
    dot = shutil.which("dot")
    if dot is None:
        return None
    try:
        proc = subprocess.run([dot, "-Tsvg"], input=dot_src.encode(), capture_output=True,
                              timeout=timeout, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if proc.returncode != 0:
        return None
    svg = proc.stdout.decode("utf-8", "replace")
    start = svg.find("<svg")
    if start < 0:
        return None
    # Drop the XML prolog and DOCTYPE (it names an external DTD) so the page stays self-contained.
    svg = svg[start:]
    return re.sub(r"<!--.*?-->", "", svg, flags=re.S)


# --------------------------------------------------------------------------- fallback layout


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def simple_svg(g: Graph) -> str:
    """Column layout: world | out-of-scope | connected | CDE, flows as curves between boxes."""
    cols = [s for s in ("world", "out-of-scope", "connected", "cde")
            if any(sc == s for sc, _ in g.nodes.values())]
    cols += sorted({sc for sc, _ in g.nodes.values()} - set(cols))
    box_w, box_h, gap_y, col_w, top = 190, 44, 26, 330, 50
    pos: dict[str, tuple[float, float]] = {}
    height = top
    for ci, scope in enumerate(cols):
        members = sorted(n for n, (s, _) in g.nodes.items() if s == scope)
        for ri, n in enumerate(members):
            pos[n] = (30 + ci * col_w, top + ri * (box_h + gap_y))
        height = max(height, top + len(members) * (box_h + gap_y))
    width = 60 + len(cols) * col_w
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}" '
           f'viewBox="0 0 {width} {height + 20}" font-family="Helvetica, Arial, sans-serif">',
           "<defs>",
           f'<marker id="arrow-allow" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
           f'<path d="M0,0 L10,4 L0,8 z" fill="{ALLOW_COLOR}"/></marker>',
           f'<marker id="arrow-deny" markerWidth="10" markerHeight="8" refX="9" refY="4" orient="auto">'
           f'<path d="M8,0 L8,8" stroke="{DENY_COLOR}" stroke-width="2"/></marker>',
           "</defs>"]
    for ci, scope in enumerate(cols):
        title, fill, border = SCOPE_STYLE.get(scope, (scope, "#ffffff", "#7f8c8d"))
        x = 15 + ci * col_w
        out.append(f'<rect x="{x}" y="10" width="{box_w + 30}" height="{height}" rx="8" fill="{fill}" '
                   f'stroke="{border}"/>')
        out.append(f'<text x="{x + 8}" y="30" font-size="12" font-weight="bold">{_esc(title)}</text>')
    for e in g.edges:
        (x1, y1), (x2, y2) = pos[e.src], pos[e.dst]
        sx, sy = x1 + box_w, y1 + box_h / 2
        ex, ey = x2, y2 + box_h / 2
        if x2 <= x1:  # same column or backwards: loop around the right side
            sx, ex = x1 + box_w, x2 + box_w
            c1x, c2x = sx + 80, ex + 80
        else:
            c1x, c2x = sx + (ex - sx) / 2, sx + (ex - sx) / 2
        color = ALLOW_COLOR if e.kind == "allow" else DENY_COLOR if e.kind == "deny" else MONITOR_COLOR
        dash = "" if e.kind == "allow" else ' stroke-dasharray="6,4"'
        marker = "arrow-allow" if e.kind == "allow" else "arrow-deny"
        out.append(f'<path d="M{sx},{sy} C{c1x},{sy} {c2x},{ey} {ex},{ey}" fill="none" stroke="{color}" '
                   f'stroke-width="1.5"{dash} marker-end="url(#{marker})"/>')
        out.append(f'<text x="{(sx + ex) / 2}" y="{(sy + ey) / 2 - 4}" font-size="9" fill="{color}" '
                   f'text-anchor="middle">{_esc(_edge_label(e))}</text>')
    for n, (x, y) in pos.items():
        name, _, rest = g.nodes[n][1].partition("\n")
        out.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="6" fill="#ffffff" stroke="#555"/>')
        out.append(f'<text x="{x + 8}" y="{y + 18}" font-size="11">{_esc(name)}</text>')
        out.append(f'<text x="{x + 8}" y="{y + 34}" font-size="9" fill="#555">{_esc(rest)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def render_diagram(report: dict[str, Any], use_dot: bool = True) -> tuple[str, str, str | None]:
    """Returns (svg, engine used, note)."""
    g = build_graph(report)
    if not g.nodes:
        return ('<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="10" y="25">'
                "no workloads or flows to draw</text></svg>", "none", g.note)
    if use_dot:
        svg = _dot_svg(to_dot(g))
        if svg is not None:
            return svg, "graphviz", g.note
    return simple_svg(g), "builtin", g.note
