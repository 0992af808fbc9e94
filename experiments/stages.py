"""Running the experiments' stages: each an ordinary command (train.py, evaluate.py, a script of scripts/) launched
by its absolute path, its output in a log file, and on the console a line when it starts (naming its log), a
progress bar read from its log while it runs, and a line when it ends (its time and outcome).

    command = python_command('train.py', 'loss=sft', ...)   # [sys.executable, ROOT/train.py, 'loss=sft', ...]
    typed(command)                                           # 'python train.py loss=sft ...', as typed from the root
    process = Process(command, out / 'logs' / 'sft.log', threads=1, what='SFT', meter=TRAINING)
    text = process.wait(); process.finish('run directory ...')
    done = run_jobs([Job('a', ...), Job('b', ..., after=('a',))], out, parallel=2, threads=1)

The bars are tqdm's, on stderr, one per running stage (side by side: one each); tqdm leaves them out where stderr
is not a terminal (`disable=None`), so a piped `make demo` shows the start and end lines only.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import tqdm

ROOT = Path(__file__).resolve().parents[1]


def python_command(script: str, *args: str) -> List[str]:
    """The command that runs ROOT/script (train.py, scripts/sample_pairs.py, ...) with this Python, from any working
    directory."""
    return [sys.executable, str(ROOT / script), *args]


def typed(command: Sequence[str]) -> str:
    """`command` as a user types it from the repository root: 'python train.py loss=sft ...'."""
    script = Path(command[1])
    shown = script.relative_to(ROOT) if script.is_absolute() and script.is_relative_to(ROOT) else script
    return shlex.join(['python', str(shown), *command[2:]])


@dataclass(frozen=True)
class Meter:
    """Where a stage's log shows how far it is: the last match of `pattern`, whose group `n` counts what is done and
    group `total` (where the log has one) what there is to do, else `total`."""
    pattern: str
    unit: str
    total: Optional[int] = None

    def reading(self, text: str) -> Optional[Tuple[int, Optional[int]]]:
        """(done, to do) at the last match in `text`, None where there is none."""
        last = None
        for last in re.finditer(self.pattern, text):
            pass
        if last is None:
            return None
        total = last.groupdict().get('total')
        return int(last['n']), int(total) if total else self.total

    def with_total(self, total: int) -> 'Meter':
        return replace(self, total=total)


def tqdm_meter(desc: str, unit: str) -> Meter:
    """The meter of a tqdm bar the stage writes to its log, named by the regular expression `desc`: with a total
    'DESC:  50%|█████     | 16/32 [00:01<00:01, ...]', without one 'DESC: 16ex [00:01, ...]'."""
    return Meter(desc + r':[^\r\n]*?(?P<n>\d+)(?:/(?P<total>\d+)|' + re.escape(unit) + r') \[', unit)


# train.py's training bar (trainers.py: desc 'Training', unit 'ex'): examples trained
TRAINING = tqdm_meter('Training', 'ex')
# generation.generate's bar in evaluate.py and judged sample_pairs.py: samples drawn
SAMPLING = tqdm_meter(r'Sampling \(T=[^)]*\)', 'sample')
# sample_pairs.py on the synthetic task: '\r64/8192 prompts, 10 pairs, 3 s'
PROMPTS = Meter(r'(?P<n>\d+)/(?P<total>\d+) prompts', 'prompt')


class Process:
    """One command running in the background (cwd ROOT), its output into `log_path`; on the console its start, a
    bar fed by `meter` from the log while it runs, and (finish) its end."""

    def __init__(self, command: List[str], log_path: Path, threads: int, what: str, meter: Optional[Meter] = None):
        self.command, self.log_path, self.what, self.meter = command, log_path, what, meter
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED='1', TOKENIZERS_PARALLELISM='false', HF_HUB_OFFLINE='1')
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        tqdm.tqdm.write(f'{what}: {typed(command)}', file=sys.stdout)
        tqdm.tqdm.write(f'{what}: started, its output in {log_path}', file=sys.stdout)
        self.start, self.wall_s = time.time(), None
        # cwd ROOT: the tools' relative defaults (such as `.cache`) resolve as in the commands the reports print,
        # which are typed from the repository root
        with open(log_path, 'w') as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.follower = threading.Thread(target=self.follow, daemon=True)
        self.follower.start()

    def follow(self) -> None:
        """Every half second until the command exits, move the bar to the meter's last reading in the log; then note
        when it exited (its wall time does not depend on when its caller waits for it: side by side, the stages
        end in any order)."""
        meter = self.meter or Meter('', 'it')
        # disable=None: no bar where stderr is not a terminal (a piped or captured run keeps its start and end lines)
        bar = tqdm.tqdm(desc=self.what, total=meter.total, unit=meter.unit, leave=False,
                        disable=None if self.meter else True, mininterval=1.0, dynamic_ncols=True)
        offset, tail = 0, ''
        with bar:
            while True:
                exited = self.process.poll() is not None
                if exited:
                    self.wall_s = time.time() - self.start
                if self.meter is not None:
                    with open(self.log_path, 'rb') as log:
                        log.seek(offset)
                        chunk = log.read()
                    offset += len(chunk)
                    # the tail of the last read: a reading split between two reads is found whole
                    text = tail + chunk.decode('utf-8', errors='replace')
                    tail = text[-400:]
                    reading = self.meter.reading(text)
                    if reading is not None:
                        bar.total, bar.n = reading[1], reading[0]
                        bar.refresh()
                if exited:
                    return
                try:  # half a second, or until the command exits
                    self.process.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    pass

    def wait(self) -> str:
        """The log's text once the command has exited; RuntimeError with the log's end if it failed."""
        returncode = self.process.wait()
        self.follower.join()
        if self.wall_s is None:  # the follower failed (its traceback is on stderr): the time it is waited for
            self.wall_s = time.time() - self.start
        text = self.log_path.read_text()
        if returncode != 0:
            raise RuntimeError(f'{self.what} failed with exit code {returncode}; the end of {self.log_path}:\n'
                               + '\n'.join(text.splitlines()[-25:]))
        return text

    def finish(self, outcome: str = '') -> None:
        """The console's line for the end of the stage: its time and its outcome."""
        tqdm.tqdm.write(f'{self.what}: done in {self.wall_s:.0f} s' + (f', {outcome}' if outcome else ''),
                        file=sys.stdout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.follower.join()


def run_dir_from_log(log_text: str, log_path) -> Path:
    """The run directory that train.py announces ('Writing to /ABSOLUTE/DIR')."""
    for line in log_text.splitlines():
        if line.startswith('Writing to '):
            return Path(line[len('Writing to '):].strip())
    raise RuntimeError(f'train.py did not announce its run directory; see {log_path}')


def pairs_summary(log_text: str) -> str:
    """What sample_pairs.py said of its pairs, the last line of its output ('OUT: 10 pairs from 64 prompts, ...')."""
    return log_text.strip().splitlines()[-1].split(': ', 1)[-1]


def evaluation_summary(log_text: str) -> str:
    """What evaluate.py said of its samples at each temperature ('T=1: mean score 0.25 ± 0.04 (n=16), KL 3.2 nats')."""
    return '; '.join(line for line in log_text.splitlines() if line.startswith('T='))


# ----- jobs that wait for others --------------------------------------------------------------------------------


@dataclass
class Job:
    """A command that may run once the jobs named in `after` have finished; `command` builds its arguments from
    their results (a training run's directory is known only once it has started), `meter` the meter of its bar, and
    `outcome` the end of its console line from its log. A job with an `output` file is not run again when that
    file exists beside a record (OUTPUT.done.json) of the same command: a later part of a sweep reuses the pairs
    sampled for the same seed and condition, and the base model's evaluation."""
    name: str
    command: Callable[[Dict[str, 'Finished']], List[str]]
    after: Tuple[str, ...] = ()
    output: Optional[Path] = None
    meter: Callable[[Dict[str, 'Finished']], Optional[Meter]] = lambda done: None
    outcome: Callable[['Finished'], str] = lambda finished: ''

    def record_path(self) -> Optional[Path]:
        return None if self.output is None else self.output.with_name(self.output.name + '.done.json')

    def reused(self, command: List[str]) -> Optional['Finished']:
        """The recorded result of an earlier run of the same command, if its output is still there."""
        record = self.record_path()
        if record is None or not (record.is_file() and self.output.is_file()):
            return None
        saved = json.loads(record.read_text())
        if saved['command'] != command[1:]:
            return None
        return Finished(self, command, saved['log_text'], saved['wall_s'])

    def save_record(self, finished: 'Finished') -> None:
        if self.record_path() is not None:
            from checkpoints import atomic_write_text  # imports torch: only where there is a record to write
            atomic_write_text(self.record_path(), json.dumps(
                {'command': finished.command[1:], 'log_text': finished.log_text, 'wall_s': finished.wall_s}))


@dataclass
class Finished:
    job: Job
    command: List[str]
    log_text: str
    wall_s: float


def run_jobs(jobs: Sequence[Job], out: Path, parallel: int, threads: int) -> Dict[str, Finished]:
    """Run `jobs` (in list order as their prerequisites allow), at most `parallel` at a time, each command's output
    in out/logs/NAME.log, `threads` torch threads each (a job whose output is recorded is reused, see Job);
    RuntimeError with the end of the log of the first that fails (the others are stopped)."""
    pending, running, done = list(jobs), {}, {}
    try:
        while pending or running:
            for job in [j for j in pending if all(a in done for a in j.after)]:
                if len(running) >= parallel:
                    break
                pending.remove(job)
                command = job.command(done)
                reused = job.reused(command)
                if reused is not None:
                    done[job.name] = reused
                    tqdm.tqdm.write(f'{job.name}: reused {job.output} (same command, {reused.wall_s:.0f} s then)',
                                    file=sys.stdout)
                    continue
                running[job.name] = (job, Process(command, out / 'logs' / f'{job.name}.log', threads, job.name,
                                                  job.meter(done)))
            if not running:
                if pending and not any(all(a in done for a in j.after) for j in pending):
                    raise RuntimeError(f'jobs {[j.name for j in pending]} wait for jobs that never run')
                continue
            time.sleep(0.5)
            for name, (job, process) in list(running.items()):
                if process.process.poll() is not None:
                    del running[name]
                    done[name] = Finished(job, process.command, process.wait(), process.wall_s)
                    job.save_record(done[name])
                    process.finish(job.outcome(done[name]))
    finally:
        for _, process in running.values():
            process.stop()
    return done
