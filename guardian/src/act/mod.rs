//! Acting on decisions: signals with identity checks, task and memory budgets, and cgroups.

pub mod budget;
pub mod cgroup;
pub mod enforce;
