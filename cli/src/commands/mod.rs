pub mod bench;
pub mod gen_checkpoint;
pub mod generate;
