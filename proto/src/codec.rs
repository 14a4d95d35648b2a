//! The protobuf codec every service and client here is generated with: prost's, except that a
//! message that does not decode (a string that is not UTF-8, a truncated field) is
//! INVALID_ARGUMENT naming the field, not INTERNAL. The bytes came from the caller; the caller
//! is who must fix them (chaosctl maps INVALID_ARGUMENT to exit 2).
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::prost::Message;
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with caller-caused decode failures as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct StrictCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for StrictCodec<T, U> {
    fn default() -> Self {
        StrictCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for StrictCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(self.0.decoder(), PhantomData)
    }
}

/// [`ProstDecoder`], its errors re-coded.
#[derive(Debug)]
pub struct StrictDecoder<U>(ProstDecoder<U>, PhantomData<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            // prost's text names the message and field ("Fault.id: invalid string value:
            // data is not UTF-8 encoded"), bounded by the schema, not by the input.
            Status::invalid_argument(s.message().to_string())
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
