pub mod bench;
pub mod bench_remote;
pub mod gen_checkpoint;
pub mod generate;
pub mod remote;
pub mod status;
pub mod up;
