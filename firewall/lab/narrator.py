"""The demo's narration and summary: a line per check, a progress bar, the table at the end.

A check that does not hold raises ``DemoError``; nothing the narrator prints holds a full card
number (``mask_digits``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from firewall.observe.redaction import mask_text


class DemoError(Exception):
    """A step did not behave as narrated (the message says what was expected and what happened)."""


class SetupError(Exception):
    """The machine cannot run the demo (not root, a tool missing, another demo running)."""


def mask_digits(text: str) -> str:
    """What the demo prints and stores: the sink's one masking rule (observe.redaction)."""
    return mask_text(text)


@dataclass
class StepResult:
    title: str
    ok: bool = False
    seconds: float = 0.0
    checks: list[str] = field(default_factory=list)
    error: str = ""


class Narrator:
    """Rich output: a progress bar over the steps, one line per check, a table at the end."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(highlight=False, quiet=quiet)
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self.task = self.progress.add_task("starting", total=total)
        self.results: list[StepResult] = []
        self.current: StepResult | None = None

    def __enter__(self) -> Narrator:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def step(self, title: str, story: str) -> StepResult:
        self.current = StepResult(title)
        self.results.append(self.current)
        self.progress.update(self.task, description=title)
        self.console.rule(f"[bold cyan]{len(self.results)}. {title}")
        for para in story.strip().split("\n\n"):
            self.console.print(" ".join(para.split()), style="dim")
        return self.current

    def say(self, text: str) -> None:
        self.console.print(f"  {text}")

    def command(self, argv: Sequence[str], where: str = "") -> None:
        from rich.markup import escape

        shown = " ".join(a if re.fullmatch(r"[\w./:=@,+-]+", a) else repr(a) for a in argv)
        self.console.print(f"  [dim]{escape(where + ' ' if where else '')}$[/dim] [green]{escape(mask_digits(shown))}[/green]")

    def check(self, ok: bool, text: str) -> None:
        """Record one expectation; a false one ends the step as failed."""
        assert self.current is not None
        if not ok:
            raise DemoError(text)
        self.current.checks.append(text)
        self.console.print(f"  [green]✔[/green] {text}")

    def done(self, res: StepResult, t0: float, error: str = "") -> None:
        res.seconds = time.monotonic() - t0
        res.ok = not error
        res.error = error
        if error:
            self.console.print(f"  [bold red]✘ {mask_digits(error)}[/bold red]")
        self.progress.advance(self.task)

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title="Palisade demo", show_lines=False)
        t.add_column("#", justify="right")
        t.add_column("step")
        t.add_column("result")
        t.add_column("checks", justify="right")
        t.add_column("time", justify="right")
        for i, r in enumerate(self.results, 1):
            res = "[green]as narrated[/green]" if r.ok else f"[red]FAILED: {mask_digits(r.error)[:90]}[/red]"
            t.add_row(str(i), r.title, res, str(len(r.checks)), f"{r.seconds:.1f}s")
        return t
