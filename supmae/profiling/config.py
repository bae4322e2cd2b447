"""`supmae profile`'s options: its own, and the run's it measures. Nothing here imports torch."""

from supmae.core.options import Config, configuration, items, option, section
from supmae.training.config import PretrainConfig

PROFILE_STAGES = ("loader", "step", "end_to_end")

# The options a profile takes from the run it measures: what is read, by what, on what, into what.
SHARED_GROUPS = ("data loading", "hardware", "model and objective")


@configuration
class ProfileConfig(Config):
    """Measure, with a run's configuration, the loader alone, the training step alone and the real loop;
    print a table and a verdict naming the stage that bounds the run, and write a JSON report and plots."""
    run: PretrainConfig = section(PretrainConfig, SHARED_GROUPS)
    steps: int = option(20, "timed steps (batches) per stage", at_least=1, group="measurement")
    warmup: int = option(3, "untimed steps first, per stage", at_least=0, group="measurement")
    window: int = option(4, "steps per timing window", at_least=1, group="measurement")
    stages: str = option(",".join(PROFILE_STAGES), "the stages to measure, comma-separated", choices=PROFILE_STAGES,
                         listed=True, group="measurement")
    out: str | None = option(None, "folder for profile.json and the plots", metavar="DIR", group="measurement",
                                shown="runs/profile-<time>")
    json: str | None = option(None, "also write the JSON report here", metavar="FILE", group="measurement")

    @property
    def stage_list(self) -> list[str]:
        return items(self.stages)
