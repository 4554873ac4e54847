package httpapi

import (
	"context"

	"github.com/gofiber/fiber/v2"

	"github.com/gpuaas/gpuaas/core/internal/errcode"
	"github.com/gpuaas/gpuaas/core/internal/httpapi/apigen"
	"github.com/gpuaas/gpuaas/core/internal/pluginhost"
)

// PluginHost is what the admin routes need from the plugin host.
type PluginHost interface {
	Install(ctx context.Context, req pluginhost.InstallRequest) (*pluginhost.Plugin, error)
	Plugins(ctx context.Context) ([]pluginhost.Plugin, error)
	SetPluginEnabled(ctx context.Context, name string, enabled bool) (*pluginhost.Plugin, error)
	Configure(ctx context.Context, instance, plugin string, config map[string]any) (*pluginhost.Instance, error)
	Instances(ctx context.Context) ([]pluginhost.Instance, error)
	SetInstanceEnabled(ctx context.Context, name string, enabled bool) (*pluginhost.Instance, error)
}

var _ PluginHost = (*pluginhost.Host)(nil)

func pluginJSON(p *pluginhost.Plugin) apigen.Plugin {
	j := apigen.Plugin{Name: p.Name, Kind: string(p.Kind), Version: p.Version, ApiVersions: p.APIVersions, Sha256: p.SHA256, Path: p.Path,
		Enabled: p.Enabled, InstalledAt: p.InstalledAt.UTC(), InstalledBy: p.InstalledBy, ConfigSchema: []apigen.ConfigField{}}
	if j.ApiVersions == nil {
		j.ApiVersions = []string{}
	}
	if p.Schema != nil {
		for _, f := range p.Schema.Fields {
			cf := apigen.ConfigField{Name: f.Name, Type: string(f.Type), Required: f.Required, Secret: f.Secret()}
			if f.Description != "" {
				d := f.Description
				cf.Description = &d
			}
			if f.Default != nil && !f.Secret() {
				d := f.Default
				cf.Default = &d
			}
			j.ConfigSchema = append(j.ConfigSchema, cf)
		}
	}
	return j
}

func instanceJSON(i *pluginhost.Instance) apigen.PluginInstance {
	j := apigen.PluginInstance{Name: i.Name, Plugin: i.Plugin, Kind: string(i.Kind), Enabled: i.Enabled, State: apigen.PluginInstanceState(i.State),
		StateReason: i.StateReason, Restarts: i.Restarts, Config: i.RedactedConfig(), SecretFields: i.SecretFields, UpdatedAt: i.UpdatedAt.UTC()}
	if j.SecretFields == nil {
		j.SecretFields = []string{}
	}
	if i.PluginVersion != "" {
		v := i.PluginVersion
		j.PluginVersion = &v
	}
	if i.APIVersion != "" {
		v := i.APIVersion
		j.ApiVersion = &v
	}
	return j
}

func (a *API) pluginHost() (PluginHost, error) {
	if a.Plugins == nil {
		return nil, errcode.New(errcode.ServiceUnavailable, "the plugin host is not running")
	}
	return a.Plugins, nil
}

// AdminListPlugins lists installed plugins.
func (a *API) AdminListPlugins(c *fiber.Ctx) error {
	if err := a.requireAdmin(c, "plugin.read"); err != nil {
		return err
	}
	h, err := a.pluginHost()
	if err != nil {
		return err
	}
	ps, err := h.Plugins(c.UserContext())
	if err != nil {
		return err
	}
	out := apigen.PluginList{Items: []apigen.Plugin{}}
	for i := range ps {
		out.Items = append(out.Items, pluginJSON(&ps[i]))
	}
	return c.JSON(out)
}

// AdminInstallPlugin installs a plugin binary.
func (a *API) AdminInstallPlugin(c *fiber.Ctx) error {
	if err := a.requireAdmin(c, "plugin.install"); err != nil {
		return err
	}
	var req apigen.InstallPluginRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	h, err := a.pluginHost()
	if err != nil {
		return err
	}
	upgrade := req.Upgrade != nil && *req.Upgrade
	p, err := h.Install(c.UserContext(), pluginhost.InstallRequest{Path: req.Path, Upgrade: upgrade})
	if err != nil {
		return err
	}
	return c.Status(fiber.StatusCreated).JSON(pluginJSON(p))
}

// AdminUpdatePlugin enables or disables a plugin.
func (a *API) AdminUpdatePlugin(c *fiber.Ctx, name apigen.PluginName) error {
	if err := a.requireAdmin(c, "plugin.update"); err != nil {
		return err
	}
	var req apigen.EnableRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	h, err := a.pluginHost()
	if err != nil {
		return err
	}
	p, err := h.SetPluginEnabled(c.UserContext(), name, req.Enabled)
	if err != nil {
		return err
	}
	return c.JSON(pluginJSON(p))
}

// AdminListPluginInstances lists instances.
func (a *API) AdminListPluginInstances(c *fiber.Ctx) error {
	if err := a.requireAdmin(c, "plugin.read"); err != nil {
		return err
	}
	h, err := a.pluginHost()
	if err != nil {
		return err
	}
	is, err := h.Instances(c.UserContext())
	if err != nil {
		return err
	}
	out := apigen.PluginInstanceList{Items: []apigen.PluginInstance{}}
	for i := range is {
		out.Items = append(out.Items, instanceJSON(&is[i]))
	}
	return c.JSON(out)
}

// AdminConfigurePluginInstance creates or reconfigures an instance.
func (a *API) AdminConfigurePluginInstance(c *fiber.Ctx, name apigen.PluginName) error {
	if err := a.requireAdmin(c, "plugin.configure"); err != nil {
		return err
	}
	var req apigen.ConfigureInstanceRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	h, err := a.pluginHost()
	if err != nil {
		return err
	}
	i, err := h.Configure(c.UserContext(), name, req.Plugin, req.Config)
	if err != nil {
		return err
	}
	return c.JSON(instanceJSON(i))
}

// AdminUpdatePluginInstance enables or disables an instance.
func (a *API) AdminUpdatePluginInstance(c *fiber.Ctx, name apigen.PluginName) error {
	if err := a.requireAdmin(c, "plugin.update"); err != nil {
		return err
	}
	var req apigen.EnableRequest
	if err := DecodeStrict(c.Body(), &req); err != nil {
		return err
	}
	h, err := a.pluginHost()
	if err != nil {
		return err
	}
	i, err := h.SetInstanceEnabled(c.UserContext(), name, req.Enabled)
	if err != nil {
		return err
	}
	return c.JSON(instanceJSON(i))
}
