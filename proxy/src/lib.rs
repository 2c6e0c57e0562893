pub mod forward;
pub mod sys;
pub mod telemetry;
