//! Replaced by the scenario runner.
