"""The speedrun: modded-nanogpt's record #92 (ANVIL2, 2026-08-30) on one 80 GB GPU, as
config/record92.py has it: 1210 + 20 steps and 343M tokens to FineWeb val loss 3.28, the
fastest recipe here (README, Speed).

Its n-gram table and the run's state take half an 80 GB card before the first activation, so
it needs such a card (README, Hardware); on a smaller one, config/record89.py (record #89,
1270 + 15 steps) fits from 24 GB. Change record #92's keys in config/record92.py, or override
them here or on the command line.
"""

from config import record92

model_config = record92.model_config
optimizer_config = record92.optimizer_config
training_config = record92.training_config
schedule = record92.schedule
data_config = record92.data_config
logging_config = record92.logging_config
compile_config = record92.compile_config
