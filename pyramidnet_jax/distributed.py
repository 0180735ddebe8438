"""Multi-host start: jax.distributed from the flags, or from the cluster the process runs in.

Explicit --coordinator_address/--num_processes/--process_id win, with JAX's cluster detection
off: it would still give a SLURM or Open MPI process only the GPU of its local rank. Without them
the environment is read in JAX's own order (Open MPI, SLURM, Cloud TPU on GKE, Cloud TPU VM), and
`jax.distributed.initialize()` finds the coordinator, the count and the index itself; we pass
only the GPUs each process drives. A lone machine gets no call at all: the Cloud TPU VM test
reads sysfs and the environment as JAX's does (no private JAX API), and asks the metadata server
only on a VM with TPU chips and libtpu. `check_devices` then compares the devices JAX sees with
what the job asked for and stops with one line when they differ.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import pathlib
import re
import sys
import urllib.request

import jax

from pyramidnet_jax import coordinator

PCI_DEVICES = '/sys/bus/pci/devices'  # Where JAX looks for TPU chips.
NVIDIA_GPUS = '/proc/driver/nvidia/gpus'  # One entry per GPU of the node.
_GOOGLE_VENDOR = '0x1ae0'
_TPU_DEVICE_IDS = {'0x0027', '0x0056', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076'}
_OMPI_URI = 'OMPI_MCA_orte_hnp_uri'  # Set by mpirun and mpiexec only.
# JAX's test for a SLURM job step, and ours: srun sets SLURM_STEP_ID (a batch script is no step).
_SLURM_STEP = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID', 'SLURM_STEP_ID')
_SLURM_LAYOUT = ('launch/slurm.sbatch runs one task per node, which drives all its GPUs; with '
                 'several tasks per node, give each its own GPUs (--gpus-per-task) or as many '
                 'tasks as GPUs')


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process runs, and what the job asked for (None: it did not say)."""
  name: str
  num_processes: int | None = None
  process_id: int | None = None
  # The GPUs this process drives, as it numbers them; None: all it sees (TPU: JAX's choice).
  local_device_ids: tuple[int, ...] | None = None
  platform: str | None = None  # 'gpu' or 'tpu'
  devices: int | None = None  # All processes together.
  local_devices: int | None = None  # This process alone.
  asked: str = ''  # The request in words, for the error.
  hint: str = ''


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, timeout_s: int = 300) -> Cluster | None:
  """jax.distributed from the flags, or from the detected cluster; the Cluster, or None alone.

  Every process then runs the same program: the global batch is split over all processes'
  devices, each reads its own shard, and only process 0 writes logs and results. Processes that
  do not all join within `timeout_s` end with an error (JAX itself would abort the process,
  without saying why).
  """
  if coordinator.check_flags(coordinator_address, num_processes, process_id):
    host, port = coordinator.parse_address(coordinator_address)
    cluster = from_flags(num_processes, process_id)
    if process_id == 0:
      coordinator.check_port_free(port, coordinator_address)
    if num_processes > 1:
      print(f'waiting up to {timeout_s}s for {num_processes} processes to join at '
            f'{coordinator_address} (this is process {process_id})', file=sys.stderr, flush=True)
    with coordinator.startup_deadline(timeout_s, lambda: coordinator.not_joined_message(
        coordinator_address, host, port, num_processes, process_id, timeout_s)):
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 local_device_ids=cluster.local_device_ids,
                                 cluster_detection_method='deactivate',
                                 initialization_timeout=timeout_s + 30)
    return cluster
  cluster = detect()
  if cluster is None or (cluster.num_processes or 1) == 1:
    return cluster
  n, i = cluster.num_processes, cluster.process_id
  print(f'waiting up to {timeout_s}s for the {n} processes of this {cluster.name} to join'
        + (f' (this is process {i})' if i is not None else ''), file=sys.stderr, flush=True)
  with coordinator.startup_deadline(timeout_s, lambda: (
      f'the {n} processes of this {cluster.name} did not all join within {timeout_s}s; check '
      'that every task started, or raise --startup_timeout_s.')):
    # JAX finds the coordinator, the count and the index itself, from the same environment.
    jax.distributed.initialize(local_device_ids=cluster.local_device_ids,
                               initialization_timeout=timeout_s + 30)
  return cluster


def detect(environ=None, metadata=None) -> Cluster | None:
  """The cluster this process runs in, in JAX's order of detection; None on a lone machine."""
  env = os.environ if environ is None else environ
  if _OMPI_URI in env:
    rank = _int(env.get('OMPI_COMM_WORLD_RANK'))
    cluster = Cluster('Open MPI job', _int(env.get('OMPI_COMM_WORLD_SIZE')), rank)
    return _drives(cluster, _gpu_share(*_mpi_layout(env)), env)
  if 'SLURM_JOB_ID' in env:
    return _slurm(env, in_step=_in_slurm_step(env))
  if _on_cloud_tpu_vm(env):
    return _cloud_tpu(env, metadata or _metadata)
  return None


def from_flags(num_processes: int, process_id: int, environ=None) -> Cluster:
  """Our flags say who is who; the environment, if any, which GPUs this process drives."""
  env = os.environ if environ is None else environ
  cluster = Cluster('job (--coordinator_address)', num_processes, process_id)
  if _OMPI_URI not in env and 'SLURM_JOB_ID' not in env:
    return cluster
  return _drives(cluster, _gpu_share(*(
      _mpi_layout(env) if _OMPI_URI in env else _slurm_layout(env))), env)


def _drives(cluster: Cluster, ids: tuple[int, ...] | None, env) -> Cluster:
  """`cluster` whose process drives the GPUs `ids` and must see exactly that many."""
  cluster = dataclasses.replace(cluster, local_device_ids=ids)
  if ids is None or not _platform_allowed(env, 'gpu'):
    return cluster
  return dataclasses.replace(
      cluster, platform='gpu', local_devices=len(ids),
      asked=f'process {cluster.process_id} should drive {len(ids)} GPU(s) of its node',
      hint='give each process the GPUs of its node (CUDA_VISIBLE_DEVICES)')


def check_devices(cluster: Cluster | None, expected_devices: int | None = None) -> None:
  """Raises ValueError (one line) if JAX's processes or devices are not what the job asked for
  (`cluster`, or the launcher's `expected_devices` over all processes), so that a job never
  trains on fewer devices than it holds."""
  processes = jax.process_count()
  detail = lambda: (f'{jax.local_device_count()} in this process, {processes} '
                    f'process{"es" * (processes > 1)}')
  if expected_devices and jax.device_count() != expected_devices:
    raise ValueError(f'--expected_devices={expected_devices} (what the launcher asked for), JAX '
                     f'sees {jax.device_count()} ({detail()}): check that every GPU or TPU of '
                     'every host is visible to this job and every process started.')
  if cluster is None:
    return
  if cluster.num_processes is not None and processes != cluster.num_processes:
    raise ValueError(f'this {cluster.name} has {cluster.num_processes} processes, JAX sees '
                     f'{processes}: start one per host (or per task), all with the same '
                     'command.')
  if processes > 1 and not jax.distributed.is_initialized():
    raise ValueError(f'JAX sees {processes} processes in this {cluster.name} but jax.distributed '
                     'was not started (its hosts could not be found): pass --coordinator_address, '
                     '--num_processes and --process_id.')
  if cluster.platform is None:
    return
  devices = jax.devices()
  kind = 'gpu' if devices[0].platform in ('gpu', 'cuda', 'rocm') else devices[0].platform
  if kind != cluster.platform:
    unit = cluster.platform.upper()
    raise ValueError(f'{cluster.asked}, JAX sees no {unit}: it runs on {devices[0].platform} '
                     f'(is jax[{"cuda12" if unit == "GPU" else "tpu"}] installed in this Python?'
                     f'); to train on the CPU on purpose, set JAX_PLATFORMS=cpu.')
  seen = {'devices': len(devices), 'local_devices': jax.local_device_count()}
  for field, count in seen.items():
    wanted = getattr(cluster, field)
    if wanted is not None and count != wanted:
      raise ValueError(f'{cluster.asked}, JAX sees {count} ({detail()}): {cluster.hint}.')


# --- Open MPI and SLURM: the processes of a node and the GPUs they see.

def _mpi_layout(env) -> tuple[int, int, int | None, int | None]:
  return (_int(env.get('OMPI_COMM_WORLD_LOCAL_SIZE')) or 1,
          _int(env.get('OMPI_COMM_WORLD_LOCAL_RANK')) or 0, _visible_gpus(env),
          _count_entries(NVIDIA_GPUS))


def _in_slurm_step(env) -> bool:
  step = env.get('SLURM_STEP_ID', '')
  # The batch script's and the allocation's own steps have reserved ids near 2**32.
  return all(v in env for v in _SLURM_STEP) and step.isdigit() and int(step) < 0xFFFFFFF0


def _slurm(env, in_step: bool) -> Cluster:
  tasks = _int(env.get('SLURM_NTASKS')) if in_step else 1
  nodes = (_int(env.get('SLURM_STEP_NUM_NODES')) if in_step else None) or _int(
      env.get('SLURM_JOB_NUM_NODES') or env.get('SLURM_NNODES')) or 1
  cluster = Cluster('SLURM job step' if in_step else 'SLURM job', tasks,
                    _int(env.get('SLURM_PROCID')) if in_step else 0,
                    _gpu_share(*_slurm_layout(env)))
  if not _platform_allowed(env, 'gpu'):
    return cluster
  per_node, per_task, total = (_slurm_node_gpus(env), _gpu_count(env.get('SLURM_GPUS_PER_TASK')),
                               _gpu_count(env.get('SLURM_GPUS')))
  if per_node:
    total, asked = per_node * nodes, f'{nodes} node{"s" * (nodes > 1)} x {per_node}'
  elif per_task and tasks:
    total, asked = per_task * tasks, f'{tasks} tasks x {per_task}'
  elif total:
    asked = 'in all'
  else:
    return cluster  # No GPUs asked for.
  hint = (_SLURM_LAYOUT if in_step else 'start the processes with srun, one per node '
          '(launch/slurm.sbatch)')
  visible = env.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    hint += f' (this process has CUDA_VISIBLE_DEVICES={visible})'
  return dataclasses.replace(cluster, platform='gpu', devices=total, hint=hint,
                             asked=f'the job asked for {total} GPUs ({asked})')


def _slurm_layout(env) -> tuple[int, int, int | None, int | None]:
  if not _in_slurm_step(env):  # A batch script or an allocation's shell: one process here.
    return 1, 0, _visible_gpus(env), _slurm_node_gpus(env)
  return (_tasks_on_this_node(env), _int(env.get('SLURM_LOCALID')) or 0, _visible_gpus(env),
          _slurm_node_gpus(env))


def _slurm_node_gpus(env) -> int | None:
  """The GPUs SLURM gave the job step (or job) on this node."""
  for name in ('SLURM_GPUS_ON_NODE', 'SLURM_STEP_GPUS', 'SLURM_JOB_GPUS', 'SLURM_GPUS_PER_NODE'):
    count = _gpu_count(env.get(name), ids=name.endswith('_GPUS'))
    if count:
      return count
  return None


def _tasks_on_this_node(env) -> int:
  """From SLURM_STEP_TASKS_PER_NODE, e.g. '8(x2)' or '2,1', at this node's index."""
  counts = []
  for part in (env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE') or
               '').split(','):
    count, _, times = part.partition('(x')
    if count.strip().isdigit():
      counts += [int(count)] * (int(times.rstrip(')')) if times.rstrip(')').isdigit() else 1)
  if not counts:
    return _int(env.get('SLURM_NTASKS_PER_NODE')) or 1
  node = _int(env.get('SLURM_NODEID')) or 0
  return counts[node] if node < len(counts) else counts[0]


def _visible_gpus(env) -> int | None:
  for name in ('CUDA_VISIBLE_DEVICES', 'ROCR_VISIBLE_DEVICES', 'HIP_VISIBLE_DEVICES'):
    value = env.get(name)
    if value is not None:
      return 0 if value.strip() in ('', '-1', 'NoDevFiles') else len(
          [v for v in value.split(',') if v.strip()])
  return None


def _gpu_share(tasks_here: int, local_rank: int, visible: int | None,
               node_gpus: int | None) -> tuple[int, ...] | None:
  """The GPUs a process drives, numbered 0.. as it sees them; None where it sees none.

  One process on the node, or processes that each see only their own GPUs (--gpus-per-task):
  all it sees. Processes that all see all the node's GPUs: an equal share by local rank (JAX's
  own choice is one GPU each, which is this with as many processes as GPUs).
  """
  if visible is None:
    visible = node_gpus or _count_entries(NVIDIA_GPUS)
  if not visible:
    return None
  shared = tasks_here > 1 and (visible >= node_gpus if node_gpus else visible >= tasks_here)
  if not shared:
    return tuple(range(visible))
  if visible % tasks_here:
    raise ValueError(f'{tasks_here} processes on this node cannot share its {visible} GPUs '
                     f'evenly: {_SLURM_LAYOUT}.')
  share = visible // tasks_here
  return tuple(range(local_rank * share, (local_rank + 1) * share))


# --- Cloud TPU.

def _on_cloud_tpu_vm(env) -> bool:
  """JAX's own test, which needs no network: TPU chips on the PCI bus and libtpu installed."""
  if not _platform_allowed(env, 'tpu'):
    return False
  if 'JAX_FORCE_TPU_INIT' in env:
    return True
  library = env.get('TPU_LIBRARY_PATH')
  if not (library and os.path.isfile(library)) and importlib.util.find_spec('libtpu') is None:
    return False
  try:
    return any(pathlib.Path(path).read_text().strip() == _GOOGLE_VENDOR and
               pathlib.Path(path).with_name('device').read_text().strip() in _TPU_DEVICE_IDS
               for path in glob.glob(os.path.join(PCI_DEVICES, '*', 'vendor')))
  except OSError:
    return False


def _cloud_tpu(env, metadata) -> Cluster | None:
  workers = env.get('TPU_PROCESS_ADDRESSES', env.get('TPU_WORKER_HOSTNAMES'))
  slices = env.get('MEGASCALE_NUM_SLICES')
  if workers is not None:  # GKE.
    name, accelerator = 'Cloud TPU slice (GKE)', env.get('TPU_ACCELERATOR_TYPE')
    process_id = _int(env.get('TPU_WORKER_ID'))
  elif 'TPU_SKIP_MDS_QUERY' in env:
    return None  # JAX does not look either.
  else:  # A TPU VM: its slice is described by the metadata server, as JAX reads it.
    name, process_id = 'Cloud TPU VM slice', None
    workers = metadata('worker-network-endpoints')
    accelerator = env.get('TPU_ACCELERATOR_TYPE') or metadata('accelerator-type')
    if slices is None and workers is not None:
      found = re.search(r"^MEGASCALE_NUM_SLICES\s*:\s*'?(\d+)", metadata('tpu-env') or '', re.M)
      slices = found and found.group(1)
  hosts = len(workers.split(',')) * (_int(slices) or 1) if workers else None
  cluster = Cluster(name, hosts, process_id)
  if any(v in env for v in ('TPU_VISIBLE_CHIPS', 'TPU_PROCESS_BOUNDS')):
    return dataclasses.replace(cluster, num_processes=None)  # Chips split between processes.
  devices = _tpu_devices(accelerator or '')
  if devices is None:
    return cluster
  devices *= _int(slices) or 1
  return dataclasses.replace(
      cluster, platform='tpu', devices=devices,
      asked=f'this {accelerator} {"slice" if hosts != 1 else "TPU VM"} has {devices} TPU devices',
      hint='every host must run the same command at the same time (launch/tpu_vm.sh)')


def _tpu_devices(accelerator: str) -> int | None:
  """JAX devices of a slice type: its suffix counts TensorCores up to v4 and v5p (one device
  per core on v2 and v3, per chip of two cores on v4 and v5p) and chips on v5e and v6e."""
  generation, _, count = accelerator.rpartition('-')
  if not count.isdigit():
    return None
  return {'v2': int(count), 'v3': int(count), 'v4': int(count) // 2, 'v5p': int(count) // 2,
          'v5litepod': int(count), 'v5e': int(count), 'v6e': int(count)}.get(generation)


def _metadata(key: str) -> str | None:
  """An attribute of this TPU VM from the metadata server; None where it has none or none
  answers. No proxy: the server is on the VM's own link."""
  host = os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  request = urllib.request.Request(f'http://{host}/computeMetadata/v1/instance/attributes/{key}',
                                   headers={'Metadata-Flavor': 'Google'})
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
  try:
    with opener.open(request, timeout=5) as response:
      return response.read().decode()
  except (OSError, ValueError):  # HTTPError and URLError are OSErrors.
    return None


# --- Small readers.

def _platform_allowed(env, platform: str) -> bool:
  """False where JAX_PLATFORMS names platforms and not this one (a CPU run on purpose)."""
  chosen = env.get('JAX_PLATFORMS', '')
  names = {'gpu': ('gpu', 'cuda', 'rocm'), 'tpu': ('tpu',)}[platform]
  return not chosen.strip() or any(p.strip() in names for p in chosen.split(','))


def _gpu_count(value: str | None, ids: bool = False) -> int | None:
  """'8' or 'a100:8' (counts, summed over types), or '0,1,2,3' (ids) -> the count."""
  if not value or not value.strip():
    return None
  if ids:
    return len(value.split(','))
  return sum(_int(part.rpartition(':')[2]) or 0 for part in value.split(',')) or None


def _count_entries(directory: str) -> int | None:
  try:
    return len(os.listdir(directory)) or None
  except OSError:
    return None


def _int(value) -> int | None:
  return int(value) if isinstance(value, str) and value.strip().isdigit() else None
