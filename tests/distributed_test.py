"""Multi-host start in simulated clusters: what reaches jax.distributed.initialize, and the check of
the devices JAX sees against what the job asked for.

Each environment is built the way its launcher builds it (srun, mpirun, a Cloud TPU VM's sysfs
and metadata server); jax.distributed.initialize is replaced by a recorder and the network is
shut, so nothing leaves this machine. Where JAX's own detection decides something, the same
environment is fed to it too (its private ClusterEnv, read-only, in `jax_own_detection` only), to
show both the fault we work around and that JAX agrees with the rest. Subprocess tests run the
real program on the CPU: a simulated SLURM job step of two processes that trains, one whose peer
never comes, and jobs that asked for more devices than JAX sees, which end with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import jax
import pytest

from pyramidnet_jax import cli
from pyramidnet_jax import distributed
from tests import helpers
from tests import multihost_test

SLURM_JOB = {  # sbatch --nodes=2 --gpus-per-node=8: what every process of the job sees.
    'SLURM_JOB_ID': '4242', 'SLURM_JOB_NAME': 'pyramidnet', 'SLURM_JOB_NUM_NODES': '2',
    'SLURM_NNODES': '2', 'SLURM_JOB_NODELIST': 'gpu[01-02]', 'SLURM_GPUS_PER_NODE': '8',
    'SLURM_SUBMIT_DIR': helpers.ROOT}
SLURM_STEP = {  # srun adds the step's own variables.
    **SLURM_JOB, 'SLURM_STEP_ID': '0', 'SLURM_STEP_NODELIST': 'gpu[01-02]',
    'SLURM_STEP_NUM_NODES': '2', 'SLURM_NODEID': '1', 'SLURM_GPUS_ON_NODE': '8',
    'SLURM_STEP_GPUS': '0,1,2,3,4,5,6,7'}
# launch/slurm.sbatch: one task per node, which sees all 8 GPUs of its node.
PER_NODE = {**SLURM_STEP, 'SLURM_NTASKS': '2', 'SLURM_PROCID': '1', 'SLURM_LOCALID': '0',
            'SLURM_STEP_TASKS_PER_NODE': '1(x2)', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
# --ntasks-per-node=8 --gpus-per-task=1: SLURM binds each task to its own GPU.
PER_GPU = {**SLURM_STEP, 'SLURM_NTASKS': '16', 'SLURM_PROCID': '13', 'SLURM_LOCALID': '5',
           'SLURM_STEP_TASKS_PER_NODE': '8(x2)', 'SLURM_GPUS_PER_TASK': '1',
           'CUDA_VISIBLE_DEVICES': '5'}
# --ntasks-per-node=8 --gpus-per-node=8: every task sees all 8 GPUs.
PER_GPU_SHARED = {**PER_GPU, 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7'}
del PER_GPU_SHARED['SLURM_GPUS_PER_TASK']
OPEN_MPI = {  # mpirun -np 16 --npernode 8, on nodes with 8 GPUs and no CUDA_VISIBLE_DEVICES.
    'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1,10.148.0.1:34911',
    'OMPI_COMM_WORLD_SIZE': '16', 'OMPI_COMM_WORLD_RANK': '9', 'OMPI_COMM_WORLD_LOCAL_RANK': '1',
    'OMPI_COMM_WORLD_LOCAL_SIZE': '8'}
# What a v4-32 TPU VM's metadata server says (4 hosts); the endpoints in the old name:id:ip form.
V4_32 = {'agent-worker-number': '2', 'accelerator-type': 'v4-32',
         'worker-network-endpoints': ','.join(f'w{i}:id{i}:10.130.0.{i + 2}' for i in range(4)),
         'tpu-env': "ACCELERATOR_TYPE: 'v4-32'\nWORKER_ID: '2'\n"}
CLUSTER_VARIABLES = ('SLURM_', 'OMPI_', 'TPU_', 'MEGASCALE_', 'JAX_', 'CUDA_VISIBLE_DEVICES',
                     'ROCR_VISIBLE_DEVICES', 'HIP_VISIBLE_DEVICES', 'KUBERNETES_SERVICE_HOST')


@pytest.fixture
def cluster_env(monkeypatch, tmp_path):
  """Sets a simulated cluster's variables (and nothing of the real one); shuts the network."""
  for name in list(os.environ):
    if name.startswith(CLUSTER_VARIABLES):
      monkeypatch.delenv(name)
  monkeypatch.setattr(distributed, 'PCI_DEVICES', str(tmp_path / 'no_pci'))
  monkeypatch.setattr(distributed, 'NVIDIA_GPUS', str(tmp_path / 'no_nvidia'))

  def no_network(*args, **kwargs):
    raise AssertionError(f'network touched: {args}')
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  monkeypatch.setattr(socket, 'create_connection', no_network)
  monkeypatch.setattr(distributed, '_metadata', no_network)

  def set_env(variables):
    for name, value in variables.items():
      monkeypatch.setenv(name, value)
  return set_env


@pytest.fixture
def recorded(monkeypatch):
  """jax.distributed.initialize replaced by a recorder of its arguments."""
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *args, **kwargs: calls.append(
      (args, kwargs)))
  return calls


def tpu_vm(tmp_path, monkeypatch, chips=4, device_id='0x005e'):
  """A TPU VM as JAX recognises one: TPU chips on the PCI bus (and a gVNIC), libtpu present."""
  pci = tmp_path / 'pci'
  for i, (vendor, device) in enumerate([('0x1ae0', '0x0042')] + [('0x1ae0', device_id)] * chips):
    (pci / f'0000:00:0{i}.0').mkdir(parents=True)
    (pci / f'0000:00:0{i}.0' / 'vendor').write_text(vendor + '\n')
    (pci / f'0000:00:0{i}.0' / 'device').write_text(device + '\n')
  monkeypatch.setattr(distributed, 'PCI_DEVICES', str(pci))
  (tmp_path / 'libtpu.so').write_bytes(b'')
  monkeypatch.setenv('TPU_LIBRARY_PATH', str(tmp_path / 'libtpu.so'))


def jax_own_detection(monkeypatch, coordinator=None, processes=None, process_id=None,
                      local_device_ids=None, tpu_metadata=None):
  """What JAX's own cluster detection makes of os.environ (and of a TPU VM's metadata)."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  from jax._src.clusters import cloud_tpu_cluster  # pylint: disable=g-import-not-at-top
  if tpu_metadata is not None:
    for module in (clusters.cluster, cloud_tpu_cluster):
      monkeypatch.setattr(module, 'running_in_cloud_tpu_vm', True)
    monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', lambda key: (
        (tpu_metadata[key], 200) if key in tpu_metadata else ('', 404)))
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
      coordinator, processes, process_id, local_device_ids, None, 10)


def test_a_lone_machine_calls_nothing(cluster_env, recorded, tmp_path, monkeypatch):
  # libtpu installed but no TPU chip (a gVNIC is Google's too): not a TPU VM, and no metadata
  # asked (the fixture fails any network use).
  tpu_vm(tmp_path, monkeypatch, chips=0)
  assert distributed.initialize(None, None, None) is None
  assert recorded == []
  distributed.check_devices(None)  # Nothing to compare with.


def test_cloud_tpu_vm_slice_is_found_through_the_metadata_server(cluster_env, recorded, tmp_path,
                                                                 monkeypatch):
  tpu_vm(tmp_path, monkeypatch)
  asked = []
  monkeypatch.setattr(distributed, '_metadata', lambda key: asked.append(key) or V4_32.get(key))
  cluster = distributed.initialize(None, None, None, timeout_s=60)
  assert (cluster.name, cluster.num_processes, cluster.platform, cluster.devices) == (
      'Cloud TPU VM slice', 4, 'tpu', 16)  # v4-32: 32 TensorCores, 16 chips, one device each.
  # JAX finds the rest, with its own metadata requests; we pass nothing but the timeout.
  assert recorded == [((), {'local_device_ids': None, 'initialization_timeout': 90})]
  assert set(asked) <= {'worker-network-endpoints', 'accelerator-type', 'tpu-env'}
  # JAX's detection reads the same slice: process 2 of 4, coordinator on worker 0.
  monkeypatch.delenv('TPU_SKIP_MDS_QUERY', raising=False)  # Set by `import jax` on this CPU.
  assert jax_own_detection(monkeypatch, tpu_metadata=V4_32) == ('10.130.0.2:8482', 4, 2, None)


def test_single_host_tpu_vm_starts_no_distributed_system(cluster_env, recorded, tmp_path,
                                                         monkeypatch):
  tpu_vm(tmp_path, monkeypatch, device_id='0x0063')  # v5e chips.
  metadata = {'worker-network-endpoints': '10.0.0.2', 'accelerator-type': 'v5litepod-8'}
  monkeypatch.setattr(distributed, '_metadata', metadata.get)
  cluster = distributed.initialize(None, None, None)
  assert recorded == [] and (cluster.num_processes, cluster.devices) == (1, 8)
  assert cluster.asked == 'this v5litepod-8 TPU VM has 8 TPU devices'


def test_cloud_tpu_on_gke_reads_the_environment_only(cluster_env, recorded, tmp_path, monkeypatch):
  tpu_vm(tmp_path, monkeypatch, device_id='0x0063')
  cluster_env({'TPU_WORKER_HOSTNAMES': 'h0,h1,h2,h3', 'TPU_WORKER_ID': '1',
               'TPU_ACCELERATOR_TYPE': 'v5litepod-16'})
  cluster = distributed.initialize(None, None, None)
  assert (cluster.name, cluster.num_processes, cluster.process_id, cluster.devices) == (
      'Cloud TPU slice (GKE)', 4, 1, 16)
  assert recorded == [((), {'local_device_ids': None, 'initialization_timeout': 330})]


def test_slurm_one_process_per_node_drives_all_its_gpus(cluster_env, recorded, monkeypatch):
  cluster_env(PER_NODE)
  # The fault: JAX alone gives the task of each node the one GPU of its SLURM_LOCALID.
  assert jax_own_detection(monkeypatch)[3] == [0]
  cluster = distributed.initialize(None, None, None)
  assert recorded == [((), {'local_device_ids': tuple(range(8)), 'initialization_timeout': 330})]
  assert (cluster.num_processes, cluster.process_id, cluster.devices) == (2, 1, 16)
  assert cluster.asked == 'the job asked for 16 GPUs (2 nodes x 8)'
  # JAX fills in the rest from the same variables and keeps our GPUs.
  assert jax_own_detection(monkeypatch, local_device_ids=cluster.local_device_ids) == (
      'gpu01:61586', 2, 1, tuple(range(8)))  # Port 4242 % 4096 + 61440, from the job id.


@pytest.mark.parametrize('env,ids', [
    (PER_GPU, (0,)),  # Its one GPU, which it numbers 0 (JAX alone would pick the 6th: none).
    (PER_GPU_SHARED, (5,)),  # The GPU of its local id: JAX's own choice.
])
def test_slurm_one_process_per_gpu(cluster_env, recorded, env, ids):
  cluster_env(env)
  cluster = distributed.initialize(None, None, None)
  assert recorded == [((), {'local_device_ids': ids, 'initialization_timeout': 330})]
  assert (cluster.num_processes, cluster.process_id, cluster.devices) == (16, 13, 16)


def test_slurm_tasks_that_cannot_share_the_gpus_evenly_are_refused(cluster_env, recorded):
  cluster_env({**PER_GPU_SHARED, 'SLURM_STEP_TASKS_PER_NODE': '3(x2)', 'SLURM_NTASKS': '6'})
  with pytest.raises(ValueError, match='3 processes on this node cannot share its 8 GPUs'):
    distributed.initialize(None, None, None)
  assert recorded == []


@pytest.mark.parametrize('local_size,ids', [('8', (1,)), ('1', tuple(range(8)))])
def test_open_mpi(cluster_env, recorded, tmp_path, monkeypatch, local_size, ids):
  gpus = tmp_path / 'nvidia'
  for i in range(8):
    (gpus / f'0000:{i:02x}:00.0').mkdir(parents=True)
  monkeypatch.setattr(distributed, 'NVIDIA_GPUS', str(gpus))
  cluster_env({**OPEN_MPI, 'OMPI_COMM_WORLD_LOCAL_SIZE': local_size})
  cluster = distributed.initialize(None, None, None)
  assert (cluster.name, cluster.num_processes, cluster.process_id) == ('Open MPI job', 16, 9)
  assert recorded == [((), {'local_device_ids': ids, 'initialization_timeout': 330})]
  assert (cluster.platform, cluster.local_devices) == ('gpu', len(ids))
  # One process per GPU is JAX's own choice too; one per node is ours.
  assert jax_own_detection(monkeypatch)[:3] == ('10.96.0.1:62624', 16, 9)
  assert jax_own_detection(monkeypatch)[3] == [1]


def test_flags_win_and_turn_off_jax_detection_inside_an_allocation(cluster_env, recorded,
                                                                   monkeypatch):
  """launch/multihost.sh with its flags, in a SLURM batch script: all GPUs of the node."""
  cluster_env({**SLURM_JOB, 'SLURM_GPUS_ON_NODE': '8', 'CUDA_VISIBLE_DEVICES': '0,1,2,3,4,5,6,7',
               'SLURM_NTASKS': '2', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0',
               'SLURM_STEP_NODELIST': 'gpu[01-02]'})
  address = f'127.0.0.1:{multihost_test.free_port()}'
  # The fault: with the flags alone, JAX would still give this process one GPU.
  assert jax_own_detection(monkeypatch, address, 2, 0)[3] == [0]
  cluster = distributed.initialize(address, 2, 0, timeout_s=60)
  assert recorded == [((address, 2, 0), {
      'local_device_ids': tuple(range(8)), 'cluster_detection_method': 'deactivate',
      'initialization_timeout': 90})]
  assert (cluster.local_devices, cluster.platform) == (8, 'gpu')


def test_flags_win_over_a_slurm_job_step(cluster_env, recorded):
  """srun's variables say process 1 of 2; the flags say process 0 of 3, and win."""
  cluster_env(PER_NODE)
  address = f'127.0.0.1:{multihost_test.free_port()}'
  cluster = distributed.initialize(address, 3, 0, timeout_s=60)
  assert recorded == [((address, 3, 0), {
      'local_device_ids': tuple(range(8)), 'cluster_detection_method': 'deactivate',
      'initialization_timeout': 90})]
  assert (cluster.num_processes, cluster.process_id) == (3, 0)


def test_flags_on_a_lone_machine(cluster_env, recorded):
  address = f'127.0.0.1:{multihost_test.free_port()}'
  cluster = distributed.initialize(address, 2, 1)
  assert recorded == [((address, 2, 1), {'local_device_ids': None,
                                         'cluster_detection_method': 'deactivate',
                                         'initialization_timeout': 330})]
  assert cluster.platform is None


class FakeDevice:
  def __init__(self, platform):
    self.platform = platform


def jax_sees(monkeypatch, devices: int, processes: int, platform: str = 'gpu',
             initialized: bool = True):
  monkeypatch.setattr(jax, 'devices', lambda *a: [FakeDevice(platform)] * devices)
  monkeypatch.setattr(jax, 'device_count', lambda *a: devices)
  monkeypatch.setattr(jax, 'local_device_count', lambda *a: devices // processes)
  monkeypatch.setattr(jax, 'process_count', lambda: processes)
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: initialized)


def one_line_error(monkeypatch, capsys, cluster, expected_devices=None) -> str:
  """check_devices run as main runs it: an expected failure becomes one `error:` line."""
  monkeypatch.setattr(cli, '_exit_quietly', lambda: sys.exit(1))
  with pytest.raises(SystemExit) as exit_:
    cli.run(lambda argv: distributed.check_devices(cluster, expected_devices))([])
  assert exit_.value.code == 1
  lines = capsys.readouterr().err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0]


def test_a_job_that_asked_for_16_gpus_and_gets_2_stops_with_one_line(cluster_env, monkeypatch,
                                                                      capsys):
  cluster_env(PER_NODE)
  cluster = distributed.detect()
  jax_sees(monkeypatch, devices=2, processes=2)
  line = one_line_error(monkeypatch, capsys, cluster)
  assert line.startswith('error: the job asked for 16 GPUs (2 nodes x 8), JAX sees 2 (1 in this '
                         'process, 2 processes): launch/slurm.sbatch runs one task per node')
  assert 'CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7' in line
  jax_sees(monkeypatch, devices=16, processes=2)
  distributed.check_devices(cluster)  # All there.


def test_the_launchers_expected_device_count_is_checked_on_any_machine(cluster_env, monkeypatch,
                                                                       capsys):
  """multihost.sh --devices_per_process and slurm.sbatch pass --expected_devices to main."""
  jax_sees(monkeypatch, devices=8, processes=2)
  line = one_line_error(monkeypatch, capsys, None, expected_devices=16)
  assert line.startswith('error: --expected_devices=16 (what the launcher asked for), JAX sees 8 '
                         '(4 in this process, 2 processes)')
  distributed.check_devices(None, expected_devices=8)
  distributed.check_devices(None, expected_devices=None)


def test_the_device_check_names_the_cpu_and_the_missing_processes(cluster_env, monkeypatch,
                                                                  capsys):
  cluster_env(PER_NODE)
  cluster = distributed.detect()
  jax_sees(monkeypatch, devices=2, processes=2, platform='cpu')
  assert 'the job asked for 16 GPUs (2 nodes x 8), JAX sees no GPU: it runs on cpu' in (
      one_line_error(monkeypatch, capsys, cluster))
  jax_sees(monkeypatch, devices=8, processes=1)
  assert 'this SLURM job step has 2 processes, JAX sees 1' in one_line_error(
      monkeypatch, capsys, cluster)
  # A TPU slice whose hosts could not be found: the TPU runtime joins them, jax.distributed not.
  jax_sees(monkeypatch, devices=16, processes=4, platform='tpu', initialized=False)
  assert 'JAX sees 4 processes in this Cloud TPU VM slice but jax.distributed was not started' in (
      one_line_error(monkeypatch, capsys, distributed.Cluster('Cloud TPU VM slice')))


def test_a_cpu_run_on_purpose_asks_for_no_gpus(cluster_env):
  cluster_env({**PER_NODE, 'JAX_PLATFORMS': 'cpu'})
  cluster = distributed.detect()
  assert cluster.platform is None and cluster.local_device_ids == tuple(range(8))


def main_env(*cluster, **variables):
  """This machine's environment without its cluster variables, then `cluster`'s, then these."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARIABLES)}
  env.pop('XLA_FLAGS', None)
  for variables_of in cluster:
    env.update(variables_of)
  return {**env, 'PYTHONPATH': helpers.ROOT, **variables}


def test_main_without_srun_in_a_job_of_16_gpus_stops_with_one_line(tmp_path):
  """The batch script ran main itself, on a machine whose JAX sees no GPU."""
  process = subprocess.run(
      multihost_test.main_command(tmp_path / 'run'), cwd=helpers.ROOT, capture_output=True,
      text=True, timeout=300, env=main_env(SLURM_JOB, SLURM_GPUS_ON_NODE='8', JAX_PLATFORMS=''))
  lines = process.stderr.strip().splitlines()
  assert process.returncode == 1 and len(lines) == 1, process.stderr[-3000:]
  assert lines[0].startswith('error: the job asked for 16 GPUs (2 nodes x 8), JAX sees')
  assert not (tmp_path / 'run').exists()


def test_main_with_fewer_devices_than_the_launcher_expected_stops_with_one_line(tmp_path):
  """launch/multihost.sh --devices_per_process=2 on a host whose JAX sees one CPU device."""
  process = subprocess.run(
      multihost_test.main_command(tmp_path / 'run', '--expected_devices=2'), cwd=helpers.ROOT,
      capture_output=True, text=True, timeout=300, env=main_env(JAX_PLATFORMS='cpu'))
  lines = process.stderr.strip().splitlines()
  assert process.returncode == 1 and len(lines) == 1, process.stderr[-3000:]
  assert lines[0].startswith('error: --expected_devices=2 (what the launcher asked for), JAX '
                             'sees 1 (1 in this process, 1 process)')
  assert not (tmp_path / 'run').exists()


@helpers.needs_fashion
def test_a_simulated_slurm_job_step_of_two_processes_trains_on_the_cpu(tmp_path):
  """srun's variables, not our flags: JAX's detection and ours start the pair, which trains."""
  port = multihost_test.free_port()
  procs = [subprocess.Popen(
      multihost_test.main_command(tmp_path / 'run', steps=2), cwd=helpers.ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=main_env(SLURM_STEP, SLURM_STEP_NODELIST='localhost', SLURM_NTASKS='2',
                   SLURM_STEP_NUM_NODES='1', SLURM_JOB_NUM_NODES='1',
                   SLURM_STEP_TASKS_PER_NODE='2', SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                   SLURM_NODEID='0', JAX_COORDINATOR_PORT=str(port), JAX_PLATFORMS='cpu'))
      for i in range(2)]
  done = [proc.communicate(timeout=600) for proc in procs]
  for proc, (_, stderr) in zip(procs, done):
    assert proc.returncode == 0, stderr[-3000:]
  assert 'waiting up to 300s for the 2 processes of this SLURM job step to join (this is ' \
         'process 0)' in done[0][1]
  assert 'test accuracy' in done[0][0] and 'test accuracy' not in done[1][0]
  assert helpers.read_results(str(tmp_path / 'run'))['steps'] == 2


def test_a_job_step_whose_peers_never_come_ends_at_the_startup_timeout(tmp_path):
  process = subprocess.run(
      multihost_test.main_command(tmp_path / 'run', '--startup_timeout_s=2'), cwd=helpers.ROOT,
      capture_output=True, text=True, timeout=120,
      env=main_env(PER_NODE, SLURM_STEP_NODELIST='localhost', SLURM_PROCID='1',
                   JAX_COORDINATOR_PORT=str(multihost_test.free_port()), JAX_PLATFORMS='cpu'))
  lines = process.stderr.strip().splitlines()
  assert process.returncode == 1 and len(lines) == 2, process.stderr[-3000:]
  assert lines[0] == ('waiting up to 2s for the 2 processes of this SLURM job step to join (this '
                      'is process 1)')
  assert lines[1] == ('error: the 2 processes of this SLURM job step did not all join within 2s; '
                      'check that every task started, or raise --startup_timeout_s.')
