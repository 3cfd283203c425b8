"""The parser every `brainage` command is built with: one place for the command line's manners.

- Options are never abbreviated (`allow_abbrev=False`): `--dat` is an error, not `--data`.
- A misspelt option or sub-command is refused with the sub-command's own usage and a
  "did you mean ...?" from `difflib` (`suggestion`).
- `--help` shows every option's default (`HelpFormatter`) and keeps descriptions as written.
- `DeprecatedAlias`: an old option spelling that still works and says which one replaced it.

`jax_brainage.cli.build_parser` makes the top parser with `BrainageParser` and passes
`SubcommandParser` to `add_subparsers`, so every sub-command, present or future, gets all of it
without doing anything.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from typing import Iterable, Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Descriptions keep their paragraphs and indented blocks (usage examples) as written and
  wrap the rest; "(default: X)" follows every option whose default means something (not None,
  not False, not an empty list) and whose help does not already say it; an option without help
  text still shows its default."""

  def _fill_text(self, text: str, width: int, indent: str) -> str:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
      lines = block.split("\n")
      if any(line.startswith((" ", "\t")) for line in lines):  # an example: verbatim
        paragraphs.append("\n".join(indent + line for line in lines))
      else:
        paragraphs.append(textwrap.fill(" ".join(line.strip() for line in lines), width,
                                        initial_indent=indent, subsequent_indent=indent))
    return "\n\n".join(paragraphs)

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if not shows_default(action) or "default" in text.lower():
      return text
    return f"{text} (default: %(default)s)" if text else "default: %(default)s"

  def _format_action(self, action: argparse.Action) -> str:
    if not action.help and shows_default(action):
      action = argparse.Action(action.option_strings, action.dest, nargs=action.nargs,
                               default=action.default, type=action.type, choices=action.choices,
                               required=action.required, help=self._get_help_string(action),
                               metavar=action.metavar)
    return super()._format_action(action)


def shows_default(action: argparse.Action) -> bool:
  """Whether `--help` states this action's default (an option with a meaningful one)."""
  if not action.option_strings or action.help == argparse.SUPPRESS:
    return False
  default = action.default
  return not (default is None or default is False or default == argparse.SUPPRESS
              or (isinstance(default, (list, tuple)) and not default)
              or isinstance(action, (argparse._HelpAction, argparse._VersionAction)))


def suggestion(word: str, candidates: Iterable[str]) -> str:
  """" (did you mean X?)" for the closest candidate (difflib ratio >= 0.6), else ""."""
  match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
  return f" (did you mean {match[0]}?)" if match else ""


class BrainageParser(argparse.ArgumentParser):
  """`argparse.ArgumentParser` with no abbreviations, defaults in the help and suggestions in
  the errors (module docstring)."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", HelpFormatter)
    kwargs["allow_abbrev"] = False
    super().__init__(*args, **kwargs)

  def option_names(self) -> list[str]:
    """Every option string this parser knows (`--data`, `-h`, ...)."""
    return [s for a in self._actions for s in a.option_strings]

  def error(self, message: str):
    """Usage and one line (argparse's), with a "did you mean" where one is close; exits 2."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
      message += suggestion(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
    elif message.startswith("unrecognized arguments: "):
      words = message[len("unrecognized arguments: "):].split()
      for word in words:
        if word.startswith("-"):
          message += suggestion(word.split("=")[0], self.option_names())
          break
    super().error(message)


class SubcommandParser(BrainageParser):
  """A sub-command's parser: an unknown option is reported by the sub-command (its usage, its
  options as suggestions) before argparse's own checks, which would otherwise name a required
  option that was only misspelt (`--dat x` -> "required: --data")."""

  def claim_extras(self, namespace: argparse.Namespace, extras: list[str]) -> list[str]:
    """Hook for sub-commands that take free-form options (`--config.KEY VALUE`): stores the
    ones it understands in `namespace` and returns the rest (here: all of them)."""
    del namespace
    return extras

  def claims(self, option: str) -> bool:
    """Whether an option this parser does not declare is still taken (by `claim_extras`)."""
    del option
    return False

  def parse_known_args(self, args: Sequence[str] | None = None, namespace=None):
    args = list(sys.argv[1:] if args is None else args)
    known = set(self.option_names())
    for word in args:
      if word == "--":
        break
      name = word.split("=")[0]
      if name.startswith("--") and name not in known and not self.claims(name):
        self.error(f"unrecognized arguments: {word}")
    namespace, extras = super().parse_known_args(args, namespace)
    extras = self.claim_extras(namespace, extras)
    if extras:
      self.error(f"unrecognized arguments: {' '.join(extras)}")
    return namespace, extras


class DeprecatedAlias(argparse.Action):
  """An old spelling of an option: stores like the new one and warns once on stderr.

      p.add_argument("--subjects", dest="n_subjects", type=int, action=DeprecatedAlias,
                     replacement="--n-subjects", help=argparse.SUPPRESS)
  """

  def __init__(self, option_strings, dest, replacement: str, **kwargs):
    kwargs.setdefault("default", argparse.SUPPRESS)
    super().__init__(option_strings, dest, **kwargs)
    self.replacement = replacement

  def __call__(self, parser, namespace, values, option_string=None):
    print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.replacement}",
          file=sys.stderr)
    setattr(namespace, self.dest, values)
