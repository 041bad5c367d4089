from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []

    operations = [
        migrations.CreateModel(
            name="InstalledPlugin",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("name", models.CharField(max_length=100, unique=True)),
                ("installed_at", models.DateTimeField(blank=True, null=True)),
                (
                    "installed_by",
                    models.CharField(blank=True, help_text="instance id of the installing node", max_length=32),
                ),
            ],
            options={"ordering": ["name"]},
        ),
    ]
