//! Generated gRPC code for the `chaos.*.v1` packages. Protobuf types stay at the edges: the
//! agent converts them to its own spec types (validating once) at the service boundary.
pub mod codec;
pub mod convert;

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("chaos.agent.v1");
    }
}
pub mod experiments {
    pub mod v1 {
        tonic::include_proto!("chaos.experiments.v1");
    }
}
pub mod fleet {
    // Generated oneofs carry whole messages inline; boxing them is prost's call, not ours.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("chaos.fleet.v1");
    }
}
