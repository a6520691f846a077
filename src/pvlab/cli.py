"""The `pvlab` command: the same tasks as `invoke`, for people who do not use Invoke.

It adds the global flags -q/--quiet and -v/--verbose (`pvlab -q boot ...`), which
apply to every task of the run like the tasks' own -q and -v.
"""

from invoke import Argument, Exit, Program

from pvlab import __version__, tasks
from pvlab.errors import PvlabError


class PvlabProgram(Program):
    """Invoke's Program with pvlab's global verbosity flags."""

    def core_args(self) -> list[Argument]:
        flags = [
            Argument(
                names=(name, tasks.SHORT_FLAGS[name]),
                kind=bool,
                default=False,
                help=tasks.VERBOSITY_HELP[name],
            )
            for name in ("quiet", "verbose")
        ]
        return [*super().core_args(), *flags]

    def parse_core(self, argv) -> None:
        super().parse_core(argv)
        try:
            tasks.set_global_verbosity(
                self.args.quiet.value, self.args.verbose.value
            )
        except PvlabError as exc:
            raise Exit(f"pvlab: error: {exc}", code=exc.exit_code) from None

    def display_with_columns(self, pairs, extra: str = "") -> None:
        super().display_with_columns(pairs, extra=extra)
        print(
            "Every task also takes -q/--quiet and -v/--verbose "
            f"(`{self.binary} --help TASK`).\n"
        )


program = PvlabProgram(namespace=tasks.ns, version=__version__, name="pvlab",
                       binary="pvlab")


def main() -> None:
    program.run()
