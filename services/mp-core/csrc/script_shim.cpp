// The one thing tch's C API lacks for a user's TorchScript module: its buffers (batch-norm
// running statistics and the like), which a PyTorch state_dict carries next to the
// parameters. Errors come back as a malloc'd message (NULL on success), never as exceptions.
#include <torch/script.h>
#include <cstring>

extern "C" {

typedef void (*mp_named_tensor_cb)(void *data, const char *name, void *tensor);

// Calls f(data, dotted name, new torch::Tensor sharing the buffer's storage) for every
// buffer of `module` and its submodules, in registration order.
char *mp_module_named_buffers(void *module, void *data, mp_named_tensor_cb f) {
  try {
    auto *m = static_cast<torch::jit::Module *>(module);
    for (const auto &b : m->named_buffers(/*recurse=*/true)) {
      f(data, b.name.c_str(), new torch::Tensor(b.value));
    }
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

// Names the submodule types, one per line ("name<TAB>qualified type"), for the import report
// (batch norm and dropout layers in a user's module).
char *mp_module_kinds(void *module, char **out) {
  try {
    auto *m = static_cast<torch::jit::Module *>(module);
    std::string s;
    for (const auto &c : m->named_modules()) {
      auto ty = c.value.type()->name();
      s += c.name + "\t" + (ty ? ty->qualifiedName() : std::string("?")) + "\n";
    }
    *out = strdup(s.c_str());
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}
}
