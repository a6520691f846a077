"""The `pvlab` command: the same tasks as `invoke`, for people who do not use Invoke."""

from invoke import Program

from pvlab import __version__
from pvlab.tasks import ns

program = Program(namespace=ns, version=__version__, name="pvlab", binary="pvlab")


def main() -> None:
    program.run()
