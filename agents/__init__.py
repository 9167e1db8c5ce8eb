"""Teachers: every agent shares ``agents.base.Teacher``; build one by name, load any saved one."""

from agents.base import AGENTS, CheckpointError, Teacher, load_teacher, make_agent

__all__ = ["AGENTS", "CheckpointError", "Teacher", "load_teacher", "make_agent"]
