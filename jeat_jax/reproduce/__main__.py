"""`python -m jeat_jax.reproduce`: runs `cli.main`."""
from absl import app, flags

from jeat_jax import reproduce
from jeat_jax.reproduce import cli

if __name__ == '__main__':
  # --help prints __main__'s docstring and key flags: the package's usage and cli's flags.
  __doc__ = reproduce.__doc__  # pylint: disable=redefined-builtin
  flags.adopt_module_key_flags(cli)
  app.run(cli.main)
