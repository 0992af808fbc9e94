"""`python train.py ARGS` whose save of step-32 stalls halfway (policy, optimizer and scheduler written, the
trainer state not yet), so a test can kill the process in the middle of writing a checkpoint."""
import sys
import time
from pathlib import Path

import hydra

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
import trainers  # noqa: E402


class StalledSaveTrainer(trainers.BasicTrainer):
    def trainer_state(self):
        if self.example_counter == 32:
            print('stalled while writing step-32', flush=True)
            time.sleep(600)
        return super().trainer_state()


@hydra.main(version_base=None, config_path='../config', config_name='config')
def main(config):
    train.prepare_run(config)
    policy, reference_model = train.build_models(config)
    StalledSaveTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference_model).train()


if __name__ == '__main__':
    main()
