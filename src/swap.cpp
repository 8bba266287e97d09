#include "duquant/swap.h"

#include <fmt/format.h>
#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>

#include <algorithm>
#include <functional>
#include <set>

#include "duquant/errors.h"
#include "duquant/ops.h"
#include "duquant/select.h"
#include "duquant/type_names.h"

namespace duquant {
namespace {

using torch::jit::Block;
using torch::jit::Graph;
using torch::jit::Module;
using torch::jit::Node;
using torch::jit::Value;

std::string join_path(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// `ops` in TorchScript source: `ops.duquant.w4a8_linear` resolves to the registered operator
// duquant::w4a8_linear, as torch/csrc/jit/serialization/import_source.cpp does when loading.
struct OperatorNamespaces : public torch::jit::SugaredValue {
  std::string kind() const override { return "operator namespaces"; }
  std::shared_ptr<torch::jit::SugaredValue> attr(const torch::jit::SourceRange&, torch::jit::GraphFunction&,
                                                 const std::string& field) override {
    return std::make_shared<torch::jit::BuiltinModule>(field);
  }
};

struct OperatorResolver : public torch::jit::Resolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(const std::string& name, torch::jit::GraphFunction& function,
                                                         const torch::jit::SourceRange& location) override {
    if (name == "ops") return std::make_shared<OperatorNamespaces>();
    return torch::jit::nativeResolver()->resolveValue(name, function, location);
  }
  c10::TypePtr resolveType(const std::string& name, const torch::jit::SourceRange& location) override {
    return torch::jit::nativeResolver()->resolveType(name, location);
  }
};

void visit_nodes(Block* block, const std::function<void(Node*)>& visit) {
  for (Node* node : block->nodes()) {
    visit(node);
    for (Block* inner : node->blocks()) visit_nodes(inner, visit);
  }
}

// Retypes a copied method graph for its new class: `self` gets the new type, and every
// module-valued prim::GetAttr output the type its (possibly new) owner declares for the slot.
// Nodes are visited in order, so a chain self.a.b sees a's new type before b is looked up.
void retype_graph(Graph& graph, const c10::ClassTypePtr& self_type) {
  graph.inputs()[0]->setType(self_type);
  visit_nodes(graph.block(), [](Node* node) {
    if (node->kind() != c10::prim::GetAttr) return;
    auto owner = node->input()->type()->cast<c10::ClassType>();
    if (!owner) return;
    auto declared = owner->findAttribute(node->s(c10::attr::name));
    if (declared && declared->cast<c10::ClassType>()) node->output()->setType(declared);
  });
}

torch::jit::Function* copy_function(torch::jit::CompilationUnit& unit, const c10::ClassTypePtr& new_type,
                                    torch::jit::Function* function) {
  auto graph = torch::jit::toGraphFunction(*function).graph()->copy();
  retype_graph(*graph, new_type);
  auto* copy = unit.create_function(c10::QualifiedName(*new_type->name(), function->name()), graph);
  const auto& schema = function->getSchema();
  auto arguments = schema.arguments();
  arguments[0] = arguments[0].cloneWithType(new_type);
  torch::jit::toGraphFunction(*copy).setSchema(schema.cloneWithArguments(std::move(arguments)));
  return copy;
}

bool has_hooks(const c10::ClassTypePtr& type) {
  return !type->getForwardHooks().empty() || !type->getForwardPreHooks().empty();
}

class Rebuilder {
 public:
  Rebuilder(std::shared_ptr<torch::jit::CompilationUnit> unit, const std::map<std::string, Module>& replacements)
      : unit_(std::move(unit)), replacements_(replacements) {
    for (const auto& [path, module] : replacements_) {
      for (auto dot = path.find('.'); dot != std::string::npos; dot = path.find('.', dot + 1)) {
        changed_prefixes_.insert(path.substr(0, dot));
      }
      changed_prefixes_.insert(path);
    }
  }

  Module rebuild(const Module& module, const std::string& path) {
    auto old_type = module.type();
    std::vector<c10::IValue> slots;
    std::vector<std::pair<size_t, c10::TypePtr>> changed;
    for (size_t slot = 0; slot < old_type->numAttributes(); ++slot) {
      auto value = module._ivalue()->getSlot(slot);
      const auto& name = old_type->getAttributeName(slot);
      const std::string child_path = join_path(path, name);
      if (value.isObject() && value.toObject()->type()->is_module() && changed_prefixes_.count(child_path)) {
        auto replacement = replacements_.find(child_path);
        Module child = replacement != replacements_.end() ? replacement->second
                                                          : rebuild(Module(value.toObject()), child_path);
        changed.emplace_back(slot, child.type());
        value = child._ivalue();
      }
      slots.push_back(value);
    }
    if (changed.empty()) return module;
    if (has_hooks(old_type)) {
      throw UserError(fmt::format("module '{}' has forward hooks; remove them before quantizing", path));
    }
    auto new_type = split_type(old_type, changed);
    auto object = c10::ivalue::Object::create(c10::StrongTypePtr(unit_, new_type), slots.size());
    for (size_t slot = 0; slot < slots.size(); ++slot) object->setSlot(slot, slots[slot]);
    return Module(object);
  }

 private:
  c10::ClassTypePtr split_type(const c10::ClassTypePtr& old_type,
                               const std::vector<std::pair<size_t, c10::TypePtr>>& changed) {
    std::vector<const void*> key = {old_type.get()};
    for (const auto& [slot, type] : changed) {
      key.push_back(reinterpret_cast<const void*>(slot));
      key.push_back(type.get());
    }
    if (auto it = memo_.find(key); it != memo_.end()) return it->second;

    auto new_type = c10::ClassType::create(unit_->mangle(*old_type->name()), unit_, /*is_module=*/true);
    size_t next_changed = 0;
    for (size_t slot = 0; slot < old_type->numAttributes(); ++slot) {
      c10::TypePtr type = old_type->getAttribute(slot);
      if (next_changed < changed.size() && changed[next_changed].first == slot) type = changed[next_changed++].second;
      new_type->addAttribute(old_type->getAttributeName(slot), type, old_type->is_parameter(slot),
                             old_type->is_buffer(slot));
    }
    for (size_t i = 0; i < old_type->numConstants(); ++i) {
      new_type->addConstant(old_type->getConstantName(i), old_type->getConstant(i));
    }
    unit_->register_type(new_type);
    for (auto* method : old_type->methods()) new_type->addMethod(copy_function(*unit_, new_type, method));
    for (const auto& property : old_type->properties()) {
      new_type->addProperty(property.name, copy_function(*unit_, new_type, property.getter),
                            property.setter ? copy_function(*unit_, new_type, property.setter) : nullptr);
    }
    memo_.emplace(std::move(key), new_type);
    return new_type;
  }

  std::shared_ptr<torch::jit::CompilationUnit> unit_;
  const std::map<std::string, Module>& replacements_;
  std::set<std::string> changed_prefixes_;
  std::map<std::vector<const void*>, c10::ClassTypePtr> memo_;
};

}  // namespace

std::vector<std::string> method_names(const Module& module) {
  std::vector<std::string> names;
  for (auto* method : module.type()->methods()) names.push_back(method->name());
  return names;
}

void check_targets_replaceable(const Module& model, const std::vector<std::string>& target_paths) {
  const std::set<std::string> targets(target_paths.begin(), target_paths.end());
  for (const auto& item : model.named_modules()) {
    auto type = item.value.type();
    const bool contains_target = std::any_of(targets.begin(), targets.end(), [&](const std::string& target) {
      return target == item.name || item.name.empty() || target.rfind(item.name + ".", 0) == 0;
    });
    if (contains_target && has_hooks(type)) {
      throw UserError(fmt::format("module '{}' has forward hooks and is or contains a target; remove the hooks "
                                  "before quantizing",
                                  item.name.empty() ? "<root>" : item.name));
    }
    // Follow module-valued prim::GetAttr chains from `self` through every method of this
    // module; a value that is a target may only be the `self` of a prim::CallMethod.
    for (auto* method : type->methods()) {
      std::map<const Value*, std::string> module_paths;
      auto graph = torch::jit::toGraphFunction(*method).graph();
      module_paths[graph->inputs()[0]] = item.name;
      visit_nodes(graph->block(), [&](Node* node) {
        if (node->kind() != c10::prim::GetAttr) return;
        auto owner = module_paths.find(node->input());
        if (owner == module_paths.end()) return;
        const std::string path = join_path(owner->second, node->s(c10::attr::name));
        if (!node->output()->type()->cast<c10::ClassType>()) return;
        module_paths[node->output()] = path;
        if (!targets.count(path)) return;
        for (const auto& use : node->output()->uses()) {
          if (use.user->kind() == c10::prim::CallMethod && use.offset == 0) continue;
          const std::string how = use.user->kind() == c10::prim::GetAttr
                                      ? fmt::format("reads its attribute '{}'", use.user->s(c10::attr::name))
                                      : fmt::format("passes it to {}", use.user->kind().toQualString());
          throw UserError(fmt::format("layer '{}' is used other than through its forward ({}.{} {}); such a "
                                      "model cannot be rewritten: call the layer as a module, or exclude it",
                                      path, unmangled_type_name(item.value), method->name(), how));
        }
      });
    }
  }
}

Module replace_submodules(const Module& model, const std::map<std::string, Module>& replacements) {
  if (replacements.empty()) return model;
  Rebuilder rebuilder(model._ivalue()->compilation_unit(), replacements);
  return rebuilder.rebuild(model, "");
}

ScriptModuleClass::ScriptModuleClass(std::shared_ptr<torch::jit::CompilationUnit> unit, std::string qualified_name,
                                     std::vector<Attribute> attributes, std::string forward_body)
    : unit_(std::move(unit)),
      qualified_name_(std::move(qualified_name)),
      attributes_(std::move(attributes)),
      forward_body_(std::move(forward_body)) {}

Module ScriptModuleClass::instantiate(const std::vector<std::string>& methods, const std::vector<c10::IValue>& values) {
  TORCH_CHECK(values.size() == attributes_.size(), "duquant: ", qualified_name_, " takes ", attributes_.size(),
              " attribute values, got ", values.size());
  auto found = types_.find(methods);
  if (found != types_.end()) {
    auto object = c10::ivalue::Object::create(c10::StrongTypePtr(unit_, found->second), values.size());
    for (size_t slot = 0; slot < values.size(); ++slot) object->setSlot(slot, values[slot]);
    return Module(object);
  }
  Module module(c10::QualifiedName(qualified_name_), unit_, /*shouldMangle=*/true);
  for (size_t i = 0; i < attributes_.size(); ++i) {
    module.register_attribute(attributes_[i].name, attributes_[i].type, values[i], false, attributes_[i].is_buffer);
  }
  std::string source = "def forward(self, x: Tensor) -> Tensor:\n" + forward_body_;
  for (const auto& name : methods) {
    if (name != "forward") source += fmt::format("\ndef {}(self, x: Tensor) -> Tensor:\n    return self.forward(x)\n", name);
  }
  module.define(source, std::make_shared<OperatorResolver>());
  types_.emplace(methods, module.type());
  return module;
}

namespace {

// Attribute order = argument order of duquant::w4a8_linear after x (include/duquant/ops.h).
std::vector<ScriptModuleClass::Attribute> w4a8_linear_attributes() {
  auto tensor = c10::TensorType::get();
  auto integer = c10::IntType::get();
  return {{"smooth_inv", tensor, true},    {"rotation1", tensor, true},    {"permutation", tensor, true},
          {"rotation2", tensor, true},     {"packed_weight", tensor, true}, {"weight_scale", tensor, true},
          {"weight_zero", tensor, true},   {"bias", tensor, true},          {"in_features", integer},
          {"out_features", integer},       {"group_size", integer},         {"act_bits", integer},
          {"act_clip", c10::FloatType::get()}};
}

constexpr const char* kW4A8LinearForward =
    "    return ops.duquant.w4a8_linear(x, self.smooth_inv, self.rotation1, self.permutation, self.rotation2,\n"
    "        self.packed_weight, self.weight_scale, self.weight_zero, self.bias, self.in_features,\n"
    "        self.group_size, self.act_bits, self.act_clip)\n";

// Empty tensors stand for skipped steps; they live on the layer's device like the rest.
torch::Tensor or_empty(const torch::Tensor& tensor, torch::ScalarType dtype,
                       const torch::Device& device = torch::kCPU) {
  return tensor.defined() ? tensor : torch::empty({0}, torch::TensorOptions().dtype(dtype).device(device));
}

}  // namespace

torch::Tensor W4A8LinearState::forward(const torch::Tensor& x) const {
  const auto device = packed_weight.device();
  return ops::w4a8_linear(x, or_empty(smooth_inv, torch::kFloat, device), or_empty(rotation1, torch::kFloat, device),
                          or_empty(permutation, torch::kLong, device), or_empty(rotation2, torch::kFloat, device),
                          packed_weight, weight_scale, weight_zero, or_empty(bias, torch::kFloat, device), in_features,
                          group_size, act_bits, act_clip);
}

W4A8LinearState W4A8LinearState::to(const torch::Device& device) const {
  W4A8LinearState moved = *this;
  for (auto* tensor : {&moved.smooth_inv, &moved.rotation1, &moved.permutation, &moved.rotation2, &moved.packed_weight,
                       &moved.weight_scale, &moved.weight_zero, &moved.bias}) {
    if (tensor->defined()) *tensor = tensor->to(device);
  }
  return moved;
}

W4A8LinearClass::W4A8LinearClass(std::shared_ptr<torch::jit::CompilationUnit> unit)
    : class_(std::move(unit), kQuantizedLinearTypeName, w4a8_linear_attributes(), kW4A8LinearForward) {}

Module W4A8LinearClass::instantiate(const std::vector<std::string>& methods, const W4A8LinearState& s) {
  return class_.instantiate(
      methods, {or_empty(s.smooth_inv, torch::kFloat), or_empty(s.rotation1, torch::kFloat),
                or_empty(s.permutation, torch::kLong), or_empty(s.rotation2, torch::kFloat), s.packed_weight,
                s.weight_scale, s.weight_zero, or_empty(s.bias, torch::kFloat), s.in_features, s.out_features,
                s.group_size, s.act_bits, s.act_clip});
}

W4A8LinearState W4A8LinearClass::read(const Module& module) {
  W4A8LinearState s;
  s.smooth_inv = module.attr("smooth_inv").toTensor();
  s.rotation1 = module.attr("rotation1").toTensor();
  s.permutation = module.attr("permutation").toTensor();
  s.rotation2 = module.attr("rotation2").toTensor();
  s.packed_weight = module.attr("packed_weight").toTensor();
  s.weight_scale = module.attr("weight_scale").toTensor();
  s.weight_zero = module.attr("weight_zero").toTensor();
  s.bias = module.attr("bias").toTensor();
  s.in_features = module.attr("in_features").toInt();
  s.out_features = module.attr("out_features").toInt();
  s.group_size = module.attr("group_size").toInt();
  s.act_bits = module.attr("act_bits").toInt();
  s.act_clip = module.attr("act_clip").toDouble();
  return s;
}

}  // namespace duquant
