"""`python train.py ARGS` whose save of step-32 stalls halfway (policy, optimizer and scheduler written, the
trainer state not yet), so a test can kill the process in the middle of writing a checkpoint."""
import sys
import time
from pathlib import Path

import hydra

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
import trainers  # noqa: E402


class Stall:
    """Pickling this stalls: torch.save of trainer_state.pt reaches it after policy.pt, optimizer.pt and
    scheduler.pt are written into the temporary checkpoint directory."""

    def __reduce__(self):
        print('stalled while writing step-32', flush=True)
        time.sleep(600)
        return int, ()


class StalledSaveTrainer(trainers.BasicTrainer):
    def trainer_state(self):
        state = super().trainer_state()
        return {**state, 'stall': Stall()} if self.example_counter == 32 else state


@hydra.main(version_base=None, config_path='../config', config_name='config')
def main(config):
    parallelism = train.prepare_run(config)
    policy, reference_model = train.build_run_models(config, parallelism)
    StalledSaveTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference_model).train()


if __name__ == '__main__':
    main()
