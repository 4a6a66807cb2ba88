"""What every chapter notebook does around its science: resolve the profile and settings, time the
chapter, read or compute its tables, and check the paper's claims with stated tolerances."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pandas as pd

from . import experiments, results
from .settings import configure_threads, default_device


class ClaimFailed(AssertionError):
    """A paper claim did not reproduce on a non-smoke profile."""


@dataclass
class Chapter:
    name: str
    profile: str
    settings: dict
    recompute: bool = False
    started: float = field(default_factory=time.time)
    checks: list = field(default_factory=list)
    deviations: dict = field(default_factory=dict)  # claim -> why it does not reproduce at this profile
    computed: bool = False  # did this run compute any table (rather than read committed results)?

    def table(self, table: str, compute) -> pd.DataFrame:
        frame = results.load_or_compute(self.profile, table, self.settings, compute, recompute=self.recompute,
                                        chapter=self.name)
        self.computed |= bool(frame.attrs.get("computed"))
        return frame

    def check(self, claim: str, ok: bool, detail: str = "", deviation: str | None = None) -> None:
        """Record a claim. A failed claim counts as a documented deviation only when the chapter states
        why for this profile (`deviation`, or `self.deviations[claim]`); otherwise it fails the run."""
        deviation = deviation or self.deviations.get(claim)
        status = "pass" if ok else ("deviates (explained)" if deviation else "FAIL")
        deviation = deviation if not ok else ""
        self.checks.append({"claim": claim, "status": status, "detail": detail, "explanation": deviation or ""})

    def report(self) -> pd.DataFrame:
        """Show the checks; on a non-smoke profile an unexplained failure raises (and fails the run)."""
        frame = pd.DataFrame(self.checks, columns=["claim", "status", "detail", "explanation"])
        minutes = (time.time() - self.started) / 60
        if self.computed:  # a run that only read committed results leaves their provenance alone
            results.record_chapter_time(self.profile, self.name, minutes)
        print(f"{self.name}: {minutes:.2f} min ({'computed' if self.computed else 'read committed results'})")
        failed = frame[frame.status == "FAIL"]
        if len(failed) and self.profile != "smoke":
            raise ClaimFailed(f"{len(failed)} claim(s) failed:\n" + failed.to_string(index=False))
        return frame


def start(name: str, profile: str | None = None, settings: list | None = None, recompute: bool = False,
          threads: int | None = None, **overrides) -> Chapter:
    """Profile resolution: the argument, else $LLFC_PROFILE, else 'paper' with a GPU / 'cpu' without."""
    configure_threads(threads)
    profile = profile or os.environ.get("LLFC_PROFILE") or experiments.default_profile()
    chosen = experiments.get_settings(profile, settings, **overrides)
    print(f"chapter {name}: profile {profile!r}, device {default_device()}, settings {list(chosen)}")
    return Chapter(name, profile, chosen, recompute or os.environ.get("LLFC_RECOMPUTE") == "1")
