"""What every chapter notebook does around its science: resolve the profile and settings, time the
chapter, read or compute its tables, and check the paper's claims with stated tolerances."""
from __future__ import annotations

import base64
import html
import io
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import partial

import pandas as pd

from . import claims, profiles, results
from .pairs import provenance
from ..runtime import configure_threads, default_device
from .width import Sweep, get_sweeps


class ClaimFailed(AssertionError):
    """A paper claim did not reproduce on a non-smoke profile."""


class ClaimWarning(UserWarning):
    """A paper claim did not reproduce, in an interactive run (see `strict_claims`)."""


def strict_claims() -> bool:
    """Unexplained failed claims raise in the book build, the headless driver and CI ($LLFC_STRICT_CLAIMS=1,
    set by `make book`, or $CI), and only warn elsewhere: a notebook opened in Colab shows what failed
    after its hours of computing instead of losing the session's state to an exception."""
    return os.environ.get("LLFC_STRICT_CLAIMS", "") == "1" or bool(os.environ.get("CI"))


@dataclass
class Chapter:
    name: str
    profile: str
    settings: dict
    recompute: bool = False
    started: float = field(default_factory=time.time)
    checks: list = field(default_factory=list)  # claim rows (`llfc_core.claims`), reviewed at the end
    deviations: dict | None = None  # None: `claims.read_deviations(profile)` (tests pass their own)
    computed: bool = False  # did this run compute any table (rather than read committed results)?
    tables: list = field(default_factory=list)  # the tables this chapter read, in order
    figures: int = 0

    def table(self, table: str, settings: list | None = None, **options) -> pd.DataFrame:
        """The chapter's rows of `table` (`tables.TABLES`) for `settings` (default: all the chapter's that the
        table covers): committed where their configuration is unchanged, else computed by the table's
        producer (`options` go to it, e.g. chapter 5's `ray_address`)."""
        from .tables import compute_table, results_hash, table_settings

        covered = table_settings(table, self.settings)
        chosen = [name for name in self.settings if (settings is None or name in settings)
                  and (covered is None or name in covered)]
        if not chosen:
            return pd.DataFrame()
        # what the manifest records of each row set: a sweep (chapter 5) says it itself, a setting through
        # `pairs.provenance`
        describe = {name: s.provenance if isinstance(s, Sweep) else partial(provenance, s)
                    for name, s in self.settings.items() if name in chosen}
        frame = results.load_or_compute(self.profile, table, {name: results_hash(table, self.settings[name]) for name in chosen},
                                        lambda name: compute_table(table, self.settings[name], **options),
                                        lambda name: describe[name](), recompute=self.recompute)
        self.computed |= bool(frame.attrs.get("computed"))
        if table not in self.tables:
            self.tables.append(table)
        return frame

    def _link(self, name: str) -> str:
        """A link to a results file, relative to the chapter (the built site holds a copy of results/)."""
        return f'<a href="../results/{self.profile}/{name}" download>{name}</a>'

    def sources(self):
        """The tables this chapter read, as links a reader can take away, with the manifest."""
        from IPython.display import HTML

        links = " · ".join(self._link(f"{t}.csv") for t in self.tables)
        return HTML(f'<p class="llfc-sources">The numbers behind this chapter (profile <code>{self.profile}</code>, '
                    f"settings {html.escape(', '.join(self.settings))}): {links}; what made them: "
                    f'{self._link("manifest.json")}.</p>')

    def figure(self, plot, what: str, table: str):
        """Show a figure with a caption that says what it is and what made it (profile, settings, the
        CSV it was drawn from): an HTML figure, so the caption travels with it into the book."""
        import matplotlib.pyplot as plt
        from IPython.display import HTML

        fig = getattr(plot, "figure", plot)  # a seaborn grid carries its matplotlib figure
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        self.figures += 1
        image = base64.b64encode(buffer.getvalue()).decode()
        shown = sorted(set(plot.data.setting)) if hasattr(plot, "data") and "setting" in plot.data else list(self.settings)
        caption = (f"<b>Figure {self.figures}.</b> {html.escape(what)} Profile <code>{self.profile}</code>; "
                   f"settings: {html.escape(', '.join(shown))}; drawn from {self._link(table + '.csv')}.")
        return HTML(f'<figure class="llfc-figure"><img src="data:image/png;base64,{image}" alt="{html.escape(what)}" '
                    f'style="max-width:100%"><figcaption>{caption}</figcaption></figure>')

    def check(self, rows: list[dict]) -> pd.DataFrame:
        """Record claim rows (from `llfc_core.claims`); returns them reviewed, to show under a figure."""
        self.checks += rows
        return self.verdicts(rows)

    def verdicts(self, rows: list[dict]) -> pd.DataFrame:
        """The measured value of each claim and its tolerance, with its status (REPAIR's habit: the
        number right under the figure it belongs to)."""
        frame = claims.review(rows, self.profile, self.deviations)
        return frame[["claim", "setting", "pair", "split", "value", "tolerance", "status", "detail"]].round(4)

    def report(self) -> pd.DataFrame:
        """All the chapter's checks with their explanations; on a non-smoke profile an unexplained failure
        raises (and fails the run), as does an explanation that no failing check uses."""
        frame = claims.review(self.checks, self.profile, self.deviations)[
            ["claim", "setting", "pair", "split", "status", "detail", "explanation"]]
        minutes = (time.time() - self.started) / 60
        if self.computed:  # a run that only read committed results leaves their provenance alone
            results.record_chapter_time(self.profile, self.name, minutes)
        print(f"{self.name}: {minutes:.2f} min ({'computed' if self.computed else 'read committed results'})")
        failed = frame[frame.status == "FAIL"]
        if len(failed) and self.profile != "smoke":
            message = f"{len(failed)} claim(s) failed:\n" + failed.to_string(index=False)
            if not strict_claims():  # an interactive run keeps hours of work on screen instead of dying
                warnings.warn(message + "\n(a warning in this interactive run; the book build and CI raise)",
                              ClaimWarning, stacklevel=2)
                return frame
            raise ClaimFailed(message)
        if self.profile == "smoke" and len(frame):
            frame = frame.assign(note="smoke: shown, not enforced")
        return frame


def resolve(name: str, profile: str | None = None, setting_names: list | str | None = None, **overrides) -> tuple:
    """(profile, {name: Setting or Sweep}) a chapter runs: the profile argument, else $LLFC_PROFILE, else by
    device; the settings named (default: the chapter's, else all of the profile's). Unknown names raise
    KeyError naming the choices."""
    profile = profile or os.environ.get("LLFC_PROFILE") or profiles.default_profile()
    from .tables import CHAPTER_SETTINGS, SWEEP_CHAPTERS

    if name in SWEEP_CHAPTERS:  # chapter 5's "settings" are its sweeps
        if overrides:
            raise ValueError(f"chapter {name} runs sweeps; setting overrides {sorted(overrides)} do not apply")
        return profile, get_sweeps(profile, setting_names)
    if setting_names is None:  # some chapters cover a subset by default (tables.CHAPTER_SETTINGS)
        setting_names = CHAPTER_SETTINGS.get(name, {}).get(profile)
    return profile, profiles.get_settings(profile, setting_names, **overrides)


def start(name: str, profile: str | None = None, setting_names: list | str | None = None, recompute: bool = False,
          threads: int | None = None, **overrides) -> Chapter:
    """Profile resolution (`resolve`): the argument, else $LLFC_PROFILE, else `profiles.default_profile()`.
    `setting_names`: a subset of the profile's settings (default: the chapter's, else all of them)."""
    configure_threads(threads)
    profile, chosen = resolve(name, profile, setting_names, **overrides)
    print(f"chapter {name}: profile {profile!r}, device {default_device()}, settings {list(chosen)}")
    return Chapter(name, profile, chosen, recompute or os.environ.get("LLFC_RECOMPUTE") == "1")
