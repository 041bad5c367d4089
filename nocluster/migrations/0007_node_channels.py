from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("nocluster", "0006_schedule"),
    ]

    operations = [
        migrations.AddField(
            model_name="node",
            name="channels",
            field=models.JSONField(blank=True, default=list, help_text="event queue channels this node consumes"),
        ),
    ]
