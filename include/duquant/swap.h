// Replacing some submodules of a TorchScript model (DESIGN.md section 5).
//
// torch.jit.script shares one ClassType among all submodules of equal concrete type, and the
// interpreter dispatches on the static type in each graph, so swapping *some* instances needs a
// type-splitting rebuild: bottom-up, an unchanged subtree keeps its object; a parent with a changed
// child gets a new ClassType (memoised by old type and new child types) whose attributes are the
// old slots (tensors shared) and whose method graphs are copies with `self` and module-valued
// prim::GetAttr outputs retyped. The original model is never mutated and stays usable.
#pragma once

#include <torch/script.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace duquant {

// UserError unless every target is a module that the model only ever calls (prim::CallMethod
// with the module as `self`): no reads of its weight, no passing it around, no hooks on it or
// on the modules that contain it.
void check_targets_replaceable(const torch::jit::Module& model, const std::vector<std::string>& target_paths);

// A copy of `model` in which the module at each path of `replacements` is the given module.
torch::jit::Module replace_submodules(const torch::jit::Module& model,
                                      const std::map<std::string, torch::jit::Module>& replacements);

// Names of the methods a module's callers may invoke on it: "forward" for scripted modules, and
// "forward", "forward1", ... for traced ones. A replacement must offer all of them.
std::vector<std::string> method_names(const torch::jit::Module& module);

// A module class defined once from TorchScript source and instantiated per layer. Its methods are
// compiled with a resolver that maps `ops.<namespace>.<op>` to registered custom operators (as
// the TorchScript importer does) and `torch.<op>` to aten.
class ScriptModuleClass {
 public:
  struct Attribute {
    std::string name;
    c10::TypePtr type;
    bool is_buffer = false;
  };
  // `forward_body`: the body of `def forward(self, x: Tensor) -> Tensor:`, indented by 4 spaces.
  ScriptModuleClass(std::shared_ptr<torch::jit::CompilationUnit> unit, std::string qualified_name,
                    std::vector<Attribute> attributes, std::string forward_body);

  // A module of this class with `values` in attribute order and with methods `methods` (each
  // running forward). One ClassType per distinct method list.
  torch::jit::Module instantiate(const std::vector<std::string>& methods, const std::vector<c10::IValue>& values);

 private:
  std::shared_ptr<torch::jit::CompilationUnit> unit_;
  std::string qualified_name_;
  std::vector<Attribute> attributes_;
  std::string forward_body_;
  std::map<std::vector<std::string>, c10::ClassTypePtr> types_;
};

// The buffers and attributes of one W4A8 layer (the arguments of duquant::w4a8_linear, ops.h).
struct W4A8LinearState {
  torch::Tensor smooth_inv, rotation1, permutation, rotation2, packed_weight, weight_scale, weight_zero, bias;
  int64_t in_features = 0;
  int64_t out_features = 0;
  int64_t group_size = -1;
  int64_t act_bits = 8;
  double act_clip = 1.0;

  // duquant::w4a8_linear of x with this state: what the module's forward computes.
  torch::Tensor forward(const torch::Tensor& x) const;
  // The same state with every tensor on `device`.
  W4A8LinearState to(const torch::Device& device) const;
};

// The W4A8Linear class (type name in type_names.h): plain tensor buffers, forward calling
// ops.duquant.w4a8_linear. Buffers move with Module::to(device) and need no custom class.
class W4A8LinearClass {
 public:
  explicit W4A8LinearClass(std::shared_ptr<torch::jit::CompilationUnit> unit);
  torch::jit::Module instantiate(const std::vector<std::string>& methods, const W4A8LinearState& state);
  // Reads the state back from a module of this class (verify, tests).
  static W4A8LinearState read(const torch::jit::Module& module);

 private:
  ScriptModuleClass class_;
};

}  // namespace duquant
