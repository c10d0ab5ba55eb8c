//! Model layers, bottom-up: rotary embeddings, attention, MLP, MoE gate.

pub mod attention;
pub mod attention_shapes;
pub mod gate;
pub mod mlp;
pub mod rope;
