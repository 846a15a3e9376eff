"""Worlds as Gymnasium environments (single and vectorised), in process or through the gateway."""

import gymnasium

from genie.envs.world_env import InProcessEngine, WorldEngine, WorldEnv, WorldVectorEnv, load_engine, real_to_latent

__all__ = ["InProcessEngine", "WorldEngine", "WorldEnv", "WorldVectorEnv", "load_engine", "real_to_latent"]

# gymnasium.make("genie/World-v0", world="worlds/demo") builds a WorldEnv over a world directory.
if "genie/World-v0" not in gymnasium.registry:
    gymnasium.register(id="genie/World-v0", entry_point="genie.envs.world_env:WorldEnv")
