"""What machine a number came from: benchmarks and reports print it beside their figures."""
import os
import platform


def cpu_model_name() -> str:
  """The CPU's model name from /proc/cpuinfo, or what `platform` knows elsewhere."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_description() -> str:
  """'<model name>, <n> cores'."""
  return f'{cpu_model_name()}, {os.cpu_count()} cores'
