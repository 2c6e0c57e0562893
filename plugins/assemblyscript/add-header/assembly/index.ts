// An HTTP plugin written in AssemblyScript against the published proxy-wasm
// SDK for it (@solo-io/proxy-runtime 0.1.8, ABI 0.2.0): it adds
// `x-added: from-assemblyscript` to every request. Built by the tests with the
// `asc` the package ships (proxy/tests/common/guests.rs) and run in Sluice:
// proof that a plugin in a second language works unmodified.

export * from "@solo-io/proxy-runtime/proxy";
import { RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context } from "@solo-io/proxy-runtime";

class AddHeaderRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new AddHeader(context_id, this);
  }
}

class AddHeader extends Context {
  constructor(context_id: u32, root_context: AddHeaderRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.add("x-added", "from-assemblyscript");
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new AddHeaderRoot(context_id); }, "add_header");
